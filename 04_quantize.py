"""Stage 4 - weight quantization, and the final model.

16 bit: every floating tensor as float16. 8 bit: per tensor, min-max normalise, times 255,
rounded to uint8, min and max stored beside. Beyond the homework: per-output-channel ranges,
1..8-bit codes, mixed layouts (mixN: the pointwise convs at N bits, the rest at 8), and
quantization-aware fine-tuning (QAT) through the very codes the file will hold, so 3 and 4 bits
keep what post-training quantization loses. Files: support/qfile.py. The final model is the
smallest file close to student_kd on the selection split (support/choose.py), of at most
max_bytes if given; validation only reports. Prints and draws every file (frontier.png), what
QAT bought, writes predictions.csv, prints every stage, and ends with the run's table (what
`python compare.py RUN` prints: teacher, scratch, distilled, pruned, final, each against the row before).

    python 04_quantize.py
"""
import re

import common  # first: Ctrl-C during the slow imports is then a clean exit
import torch
from torch.func import functional_call

from support import choose, files, plots, qfile, reports
from support.images import load_split, storage
from support.resume import Resumable, check_resume
from support.running import UserError, run, say_last, warn
from support.settings import (adopt_from, adopt_teacher_settings, as_given, check_selection, configure, parse_list,
                              pick_device, resize_of)

# --- settings (each can be overridden as --name=value) -------------------------------------
recipe = "ours"  # ours, or course: the homework's choices (support/presets/course.py) for every setting you leave alone
img_size = 224  # crop size (pixels); student_kd.pt's record unless you set it
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale; student_kd.pt's record unless you set it
batch_size = 64  # images per step
models = "student_kd,student_pruned"  # checkpoints (in ckpt_dir) to quantize; missing ones are skipped
variants = "fp16,q8,q8c,q6c,q4c,q3c,mix4,mix3"  # fp16; qN: N bits per tensor; qNc: per output channel; mixN: pointwise convs at N bits, the rest at 8
qat_models = "student_pruned"  # checkpoints to fine-tune quantization-aware (QAT)
qat_variants = "q6c,q4c,q3c,mix4,mix3"  # layouts QAT trains through (each written as <model>.qat.<variant>); "" = no QAT
qat_epochs = 3  # epochs of each quantization-aware fine-tune
qat_lr = 5e-4  # its peak learning rate (AdamW, one-cycle schedule)
weight_decay = 0.0  # AdamW weight decay in QAT
rotate = 10.0  # QAT augmentation: random rotation up to this many degrees; as student_kd.pt records unless you set it
jitter = 0.1  # QAT augmentation: brightness/contrast/saturation jitter; as student_kd.pt records unless you set it
mix = "cutmix"  # mix each training view with a partner image's: none, mixup or cutmix (labels mixed alike); as student_kd.pt records unless you set it
mix_alpha = 1.0  # mixup's own share is drawn from Beta(mix_alpha, mix_alpha); CutMix's box covers 1 - such a share; as student_kd.pt records unless you set it
temperature = 4.0  # distillation temperature in QAT (when the teacher is there); as student_kd.pt records unless you set it
alpha = 1.0  # distillation weight in QAT; as student_kd.pt records unless you set it
use_teacher = True  # QAT with the distillation loss when teacher_resnet18.bin exists
teacher_views = 0  # distinct training views (epoch e uses view e mod this); 0 = as many as student_kd.pt was distilled with
teacher_norm = "none"  # input normalisation of a teacher file without a note: none or imagenet; as student_kd.pt records unless you set it
seed = 0  # random seed (batch order, augmentation); as student_kd.pt records unless you set it
choose_by = "loss"  # the final model: the smallest file whose selection loss (cross-entropy) is within max_loss_rise of student_kd's; acc: whose selection accuracy is within max_acc_drop
max_loss_rise = 0.02  # allowed rise of the selection loss over student_kd's, as a fraction (0.02: 2%, about 1 point of accuracy)
max_acc_drop = 0.01  # allowed drop of the selection accuracy below student_kd's, with choose_by=acc
max_bytes = 0  # a budget: the rule above among the files of at most this many bytes (none passes: the best of them on selection; none fits: the smallest file); 0 = none
select_fraction = 0.1  # share of training held out to choose the final file; student_kd.pt's record unless you set it
other_selection = False  # allow a selection split other than the one the starting model was made with (it may have trained on its images)

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off
teacher_bank = True  # read the teacher's answers from the bank 02 built; False: ask it on every batch
resume = False  # continue an interrupted QAT; finished ones are reused


# ============================================================================================
# The method: min-max codes, the layouts, and fake quantization for QAT
# ============================================================================================

def minmax_quantize(x, bits, per_channel, range_dtype=torch.float32, compute=torch.float64):
    """Min-max quantization: code = round((x - min) / (max - min) * (2^bits - 1)), with min and
    max per tensor (one row) or per output channel (one row each), as the file stores them
    (range_dtype); (codes in `compute`'s precision, lo, hi). The one place the codes are made, for
    files (float64, CPU) and QAT (float32 on the device), so a file computes what QAT evaluated."""
    rows = x.detach().to(compute).reshape(x.shape[0] if per_channel else 1, -1)
    lo, hi = rows.min(1).values.to(range_dtype), rows.max(1).values.to(range_dtype)
    lo_c, hi_c = lo.to(compute)[:, None], hi.to(compute)[:, None]
    span = torch.where(hi_c > lo_c, hi_c - lo_c, torch.ones_like(lo_c))  # a constant row codes as 0
    levels = 2 ** bits - 1
    return torch.round((rows - lo_c) / span * levels).clamp_(0, levels), lo, hi


VARIANT_PATTERN, VARIANTS = r"fp16|q[1-8]c?|mix[1-8]", "fp16, qN, qNc or mixN (N = 1..8)"


def layout_of(variant, state_dict):
    """(bits, per_channel, plan) of a variant: fp16; qN, N bits per tensor; qNc, per output
    channel; mixN, the pointwise convs (most of the weights) at N bits per channel and every
    other tensor (first conv, depthwise convs, BatchNorms, biases, classifier) at 8. Below 8
    bits the 1-D tensors (BatchNorm vectors, biases: about 2% of the numbers) stay at 8: a
    BatchNorm variance coded in 3 or 4 bits scales its channel wrongly by 3-4x."""
    if variant == "fp16":
        return 16, False, None
    if variant.startswith("mix"):
        low = int(variant[3:])
        return 8, True, {name: low for name in state_dict if re.fullmatch(r"cnn\.\d+\.3\.weight", name)}
    bits, per_channel = int(variant[1]), variant.endswith("c")
    if bits == 8:
        return 8, per_channel, None
    return 8, per_channel, {name: bits for name, t in state_dict.items() if t.is_floating_point() and t.ndim >= 2}


def encode(state_dict, variant):
    """The arrays of `variant`'s file for a state_dict: min-max codes in the variant's layout."""
    return qfile.encode(state_dict, *layout_of(variant, state_dict), quantize=minmax_quantize)


class FakeQuant(common.StudentNet):
    """A StudentNet whose forward sees its tensors as `variant`'s file will store them (the same
    min-max codes); a straight-through estimator hands each weight the gradient of its quantized
    value. Training makes the codes in float32 on the device (Apple GPUs have no float64); eval
    mode runs on the decoded file's tensors, made once, so its logits are the file's."""

    def __init__(self, model, variant):
        super().__init__(widths=model.widths, num_classes=model.fc[0].out_features)
        self.load_state_dict(model.state_dict())
        self.variant, self.as_file = variant, None
        self.bits, self.per_channel, self.plan = layout_of(variant, self.state_dict())
        self.range_dtype = qfile.ranges_dtype(self.state_dict().values(), self.per_channel)  # decided once

    def quantized(self, name, t):
        bits = (self.plan or {}).get(name, self.bits)
        q, lo, hi = minmax_quantize(t, bits, self.per_channel and t.ndim >= 2, self.range_dtype, torch.float32)
        return qfile.dequantize(q, lo, hi, bits, t.shape, t.dtype, torch.float32)

    def file_state(self):
        """Every tensor as the file decodes it, on the model's device, decoded again only when a
        tensor has changed (in place, by load_state_dict) or moved."""
        tensors = [*self.parameters(), *self.buffers()]
        key = [(t.device, t._version) for t in tensors]
        if self.as_file is None or self.as_file[0] != key:
            decoded = qfile.decode(encode(common.cpu_state_dict(self), self.variant))
            self.as_file = key, {n: t.to(tensors[0].device) for n, t in decoded.items()}
        return self.as_file[1]

    def forward(self, x):
        if self.training:
            state = {n: p + (self.quantized(n, p) - p).detach() for n, p in self.named_parameters()}
        else:
            state = self.file_state()

        def part(prefix):
            return {n.removeprefix(prefix): v for n, v in state.items() if n.startswith(prefix)}
        features = functional_call(self.cnn, part("cnn."), (x,))
        return functional_call(self.fc, part("fc."), (features.flatten(1),))


# ============================================================================================
# Quantize, fine-tune, measure, choose the final model
# ============================================================================================

def main():
    cfg = configure(globals())
    variants = parse_list(cfg.variants, "variants", VARIANT_PATTERN, what=VARIANTS)
    qat_variants = parse_list(cfg.qat_variants, "qat_variants", VARIANT_PATTERN, allow_empty=True, what=VARIANTS)
    if "fp16" in qat_variants:
        raise UserError("--qat_variants: fp16 has no codes to train through; give qN, qNc or mixN")
    qat_names = parse_list(cfg.qat_models, "qat_models", allow_empty=True) if qat_variants else []
    names = list(dict.fromkeys(parse_list(cfg.models, "models") + qat_names))  # QAT's starts get PTQ rows too
    variants = list(dict.fromkeys(variants + qat_variants))  # so QAT is compared at the same bits
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    recorded = adopt_from(cfg, ckpt_dir / "student_kd.pt", "02_distill.py")
    for name in qat_names if "qat_models" in cfg.given else []:  # the user named them: they must be there
        files.require(ckpt_dir / f"{name}.pt", "03_prune.py" if "pruned" in name else "02_distill.py")
    adopt_teacher_settings(cfg, recorded["metrics"], cfg.qat_epochs)
    qat_paths = {(name, v): ckpt_dir / (f"{name}.qat.{v}.pt" if v else f"{name}.ft.pt")  # v None: the control
                 for name in qat_names for v in [None, *qat_variants] if (ckpt_dir / f"{name}.pt").exists()}
    check_resume(cfg, *qat_paths.values())
    files.teacher_note(ckpt_dir)  # a damaged note is said now
    data = common.data_for(cfg, recorded=recorded)
    device = pick_device(cfg.device)
    score = common.Scorer(data, cfg, device)

    def load(name):
        """(model, its preprocessing with any sizes the user chose, its metrics)."""
        made_by = "03_prune.py" if "pruned" in name else "02_distill.py"
        model, preprocess, metrics = common.load_model(ckpt_dir / f"{name}.pt", "student", data.num_classes, made_by=made_by)
        if name != "student_kd":  # student_kd's selection was checked when the data was loaded
            check_selection(data.selection, preprocess, f"{name}.pt", cfg.other_selection)
        return model, as_given(cfg, preprocess), metrics

    kd, kd_preprocess, _ = load("student_kd")
    kd_val, kd_select = score.both(kd, kd_preprocess)  # the reference every file is held to
    rows, records, outputs = [], [], []  # rows: one per model and variant, the files' sizes and scores

    def quantize(name, variant, model, preprocess, source):
        """Write `name.variant` (.npz, zipped .z.npz), score what decodes, note its row (from checkpoint `source`)."""
        arrays = encode(common.cpu_state_dict(model), variant)
        plain, packed = ckpt_dir / f"{name}.{variant}.npz", ckpt_dir / f"{name}.{variant}.z.npz"
        qfile.save_quantized(files.new_path(plain), arrays, common.arch_of(model), preprocess)
        qfile.save_quantized(files.new_path(packed), arrays, common.arch_of(model), preprocess, compressed=True)
        decoded = common.load_model(files.new_path(plain))[0]
        val, select = score.both(decoded, preprocess)
        sizes = files.file_bytes(files.new_path(plain)), files.file_bytes(files.new_path(packed))
        rows.append({"model": name, "variant": variant, "label": f"{name}.{variant}".replace("student_", ""),
                     "bytes_plain": sizes[0], "bytes_zip": sizes[1],
                     "bytes": min(sizes), "path": plain if sizes[0] <= sizes[1] else packed,
                     "val": val, "select": select, "from": source})
        records.append(common.model_record("4 quantization", f"{name}.{variant}", decoded, files.new_path(plain),
                                           val, preprocess.get("img_size", cfg.img_size), bytes_zip=sizes[1],
                                           select_acc=round(select.acc, 4), select_loss=round(select.loss, 4),
                                           chosen_on=data.chosen_on))
        outputs.extend([plain, packed])

    # --- post-training quantization ----------------------------------------------------------
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.exists() and name != "student_kd":
            print(f"{path.name} not found; skipped")
            continue
        model, preprocess, _ = load(name)
        val, select = (kd_val, kd_select) if name == "student_kd" else score.both(model, preprocess)
        rows.append({"model": name, "variant": "fp32 .pt", "label": path.name, "bytes": files.file_bytes(path), "path": path,
                     "val": val, "select": select, "from": name})
        for variant in variants:
            quantize(name, variant, model, preprocess, name)

    # --- quantization-aware fine-tuning, and its control: the same epochs in float, then PTQ --
    augment = common.augment_of(cfg)
    loss, asked = common.cross_entropy(), None
    if qat_paths and cfg.use_teacher and (ckpt_dir / files.TEACHER_FILE).exists():
        asked = common.teacher_for(cfg, ckpt_dir, data, augment, device, range(min(cfg.teacher_views, cfg.qat_epochs)))
        loss = common.distill_loss(asked, cfg.temperature, cfg.alpha)
    for (name, variant), path in qat_paths.items():
        model, preprocess, _ = load(name)
        what = f"QAT: {name} through {variant}'s codes" if variant else f"control: {name} in float"
        print(f"\n{what}, {cfg.qat_epochs} epochs ({'distillation' if asked else 'cross-entropy'}, lr {cfg.qat_lr}), "
              "the last kept")
        common.fit(FakeQuant(model, variant) if variant else model, data, loss, epochs=cfg.qat_epochs, lr=cfg.qat_lr,
                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, augment=augment, views=cfg.teacher_views,
                   norm=preprocess["norm"], device=device, out=Resumable(path, cfg),
                   desc=f"QAT {variant}" if variant else "float")
        tuned = common.load_model(files.new_path(path))[0]
        for v in [variant] if variant else qat_variants:
            quantize(f"{name}.qat" if variant else f"{name}.ft", v, tuned, preprocess, name)
        outputs.append(path)
    if asked:
        print(f"the teacher saw {asked.images:,} training images in this run")

    # --- the frontier, and the final model: the smallest file close to student_kd on selection
    reports.pareto(rows)
    budget = (cfg.max_bytes, "bytes")
    final = choose.smallest_close(rows, lambda r: r["bytes"], kd_select, cfg, "file", budget)
    reports.print_files(rows, final, kd_val.n, len(data.select.labels))
    reports.print_qat_gain(rows, qat_paths)
    print(f"\nfinal model, chosen on {data.chosen_on}: {final['path'].name}: {final['bytes']:,} bytes, "
          f"val acc {final['val']} (selection loss {final['select'].loss:.4f}, acc {final['select'].acc:.4f}; "
          f"student_kd {kd_select.loss:.4f} and {kd_select.acc:.4f} there; {final['chosen_by']})")
    plot = ckpt_dir / "frontier.png"
    teacher = reports.recorded_val(files.read_results(ckpt_dir), "teacher_resnet18", kd_val.key)
    plots.plot_frontier(files.new_path(plot), rows, kd_val.acc, final, [r for r in rows if r["label"] == "student_kd.pt"],
                        teacher and teacher.acc)
    records.append({"stage": "4 quantization", "model": "final", "file": final["path"].name,
                    "bytes": final["bytes"], **reports.score_fields(final["val"]),
                    "select_acc": round(final["select"].acc, 4), "select_loss": round(final["select"].loss, 4),
                    "chosen_on": data.chosen_on, "from": final["from"]})
    outputs += write_submission(final["path"], final["path"] in outputs, data, cfg, ckpt_dir, device)
    outputs.append(plot)
    written = files.publish(ckpt_dir, outputs, records, finished=[Resumable(p, cfg).state for p in qat_paths.values()],
                            replaces_outputs=True)
    reports.print_summary(ckpt_dir, data.chosen_on, data.val.labels.numel())
    print("\n" + reports.run_table_text(files.read_results(ckpt_dir)))
    say_last(f"\nwrote {len(outputs)} files in {ckpt_dir} (*.npz, *.z.npz, frontier.png"
             + (", predictions.csv" if data.test is not None else "") + f") and {written[-1]}")


def write_submission(path, written_now, data, cfg, ckpt_dir, device):
    """predictions.csv (as a .new file) from the final model, read from its .new file when this
    run wrote it; returns what to publish."""
    if data.test is None:
        warn(f"{data.root} has no testing/ split; no predictions written")
        return []
    model, preprocess, _ = common.load_model(files.new_path(path) if written_now else path)
    test, crop = data.test, preprocess.get("img_size", cfg.img_size)
    stored = storage(preprocess.get("resize", resize_of(cfg)), crop)
    if stored != storage(resize_of(cfg), cfg.img_size):
        test = load_split(cfg.data_dir, "testing", stored[0], False, cfg.get("cache_dir"), stored[1])
    preds = common.logits_of(common.prepare(model, device), test.images.to(device), cfg.batch_size, crop,
                             preprocess["norm"]).argmax(1)
    out = ckpt_dir / "predictions.csv"
    count, unreadable = reports.write_predictions(files.new_path(out), test, preds)
    print(f"predictions for {count} testing images -> {out}"
          + (f" ({unreadable} unreadable images given class 0)" if unreadable else ""))
    return [out]


if __name__ == "__main__":
    run(main)
