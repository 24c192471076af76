"""Stage 4 - weight quantization, and the final model.

16 bit: every floating tensor as float16. 8 bit: per tensor, min-max normalise, times 255,
rounded to uint8, min and max stored beside; decoding restores q/255*(max-min)+min. Beyond the
homework: per-output-channel ranges (stored as float16) and 1..8-bit packed codes; mixed
layouts (mixN: the pointwise convs at N bits, the rest at 8, each tensor's bits recorded); and
quantization-aware fine-tuning (QAT): the model trains through the very codes its file will
hold (a straight-through estimator; the distillation loss, read from the teacher bank), so
3 and 4 bits keep what post-training quantization loses. Every file is also zip-compressed.
Files are .npz (np.load(..., allow_pickle=False)) and carry the model's arch and
preprocessing, so they load without being told the shape.

The final model is the smallest file within max_acc_drop of student_kd's accuracy on the
selection split (held out of training; validation only reports). The script prints every file
as a bytes-vs-accuracy frontier (and draws it, checkpoints/frontier.png), what QAT bought
over post-training quantization at the same bits, writes checkpoints/predictions.csv in the
course's format, and ends with the table of every stage and each stage against the one
before on the same validation images.

    python 04_quantize.py
"""
import json
import math
import re
import zipfile
from pathlib import Path

import common  # first: Ctrl-C during the slow imports is then a clean exit
import cv2
import numpy as np
import torch
from torch.func import functional_call

# --- settings (each can be overridden as --name=value) -------------------------------------
data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
recipe = "ours"  # ours, or course: the homework's choices in one word (native-scale 256 crops, rotation 15, no jitter, no normalisation, constant lr 1e-3, batch 32, ...; README); each still overridable
img_size = 224  # crop size (pixels); student_kd.pt's record wins unless given
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale; student_kd.pt's record wins unless given
batch_size = 64  # images per step
models = "student_kd,student_pruned"  # checkpoints (in ckpt_dir) to quantize; missing ones are skipped
variants = "fp16,q8,q8c,q6c,q4c,q3c,mix4,mix3"  # fp16; qN: N bits per tensor; qNc: per output channel; mixN: pointwise convs at N bits, the rest at 8
qat_models = "student_pruned"  # checkpoints to fine-tune quantization-aware (QAT)
qat_variants = "q6c,q4c,q3c,mix4,mix3"  # layouts QAT trains through (each written as <model>.qat.<variant>); "" = no QAT
qat_epochs = 3  # epochs of each quantization-aware fine-tune
qat_lr = 5e-4  # its peak learning rate (AdamW, one-cycle schedule)
weight_decay = 0.0  # AdamW weight decay in QAT
rotate = 10.0  # QAT augmentation: random rotation up to this many degrees
jitter = 0.1  # QAT augmentation: brightness/contrast/saturation jitter
temperature = 20.0  # distillation temperature in QAT (when the teacher is there)
alpha = 0.5  # distillation weight in QAT
use_teacher = True  # QAT with the distillation loss when teacher_resnet18.bin exists
teacher_bank = True  # read the teacher's answers from the bank 02 built; False: ask it on every batch
teacher_views = 0  # distinct training views (epoch e uses view e mod this); 0 = as many as student_kd.pt was distilled with
teacher_norm = "none"  # input normalisation of a teacher file without a note: none or imagenet
seed = 0  # random seed (batch order, augmentation)
resume = False  # continue an interrupted QAT; finished ones are reused
max_acc_drop = 0.01  # the final model: the smallest file within this of student_kd's accuracy on the selection split
select_fraction = 0.1  # share of training held out to choose the final file; student_kd.pt's record wins unless given
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off


# ============================================================================================
# Codecs: a state_dict <-> a few flat numpy arrays and a JSON description
# ============================================================================================

def encode16(state_dict):
    return encode(state_dict, 16)


def encode8(state_dict, per_channel=False):
    return encode(state_dict, 8, per_channel)


def encode(state_dict, bits, per_channel=False, plan=None):
    """Arrays for np.savez: 'meta' (JSON), 'ints' (integer buffers as they are), and either
    'f16' (bits=16) or 'q' (min-max codes, bit-packed) with 'lo'/'hi' (the ranges).

    per_channel: a range per output channel (row) of every tensor of 2 or more dimensions,
    stored as float16 (a float32 pair per row would cost more than 4-bit codes save); per
    tensor the ranges stay float32, as the course's files have them. plan: {name: bits} makes
    a mixed layout, each tensor at its own width (the others at `bits`), each recorded."""
    if not (bits == 16 or 1 <= bits <= 8) or (plan and (bits == 16 or not all(1 <= b <= 8 for b in plan.values()))):
        raise ValueError(f"bits must be 16 or 1..8, got {bits}" + (f" and {sorted(set(plan.values()))}" if plan else ""))
    range_dtype = ranges_dtype(state_dict.values(), per_channel)
    specs, ints, floats, codes, los, his = [], [], [], [], [], []
    for name, t in state_dict.items():
        x = t.detach().cpu()
        spec = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if not x.is_floating_point():
            spec["store"] = "ints"
            ints.append(x.reshape(-1).to(torch.int64).numpy())
        elif bits == 16:
            spec["store"] = "f16"
            floats.append(x.reshape(-1).to(torch.float16).numpy())
        else:
            spec["store"] = "q"
            b = plan.get(name, bits) if plan else bits
            q, lo, hi = minmax_quantize(x, b, per_channel and x.ndim >= 2, range_dtype)
            q = q.to(torch.uint8).reshape(-1).numpy()
            codes.append(pack_bits(q, b) if plan else q)
            los.append(lo.numpy())
            his.append(hi.numpy())
            if plan:
                spec["bits"] = b
        specs.append(spec)
    meta = {"bits": "mixed" if plan else bits, "per_channel": per_channel, "tensors": specs}
    arrays = {"ints": concat(ints, np.int64)}
    if bits == 16:
        arrays["f16"] = concat(floats, np.float16)
    else:
        arrays["q"] = concat(codes, np.uint8) if plan else pack_bits(concat(codes, np.uint8), bits)
        dtype = np.float16 if range_dtype == torch.float16 else np.float32
        arrays["lo"], arrays["hi"] = concat(los, dtype), concat(his, dtype)
    arrays["meta"] = json_array(meta)
    return arrays


def ranges_dtype(tensors, per_channel):
    """How a file stores its ranges: float16 per channel (float32 pairs would cost a fifth of a
    4-bit file), unless a value lies beyond float16's range; float32 per tensor, as the course's."""
    big = any(t.is_floating_point() and t.numel() and t.detach().abs().max() > 65504 for t in tensors)
    return torch.float16 if per_channel and not big else torch.float32


def json_array(obj):
    """JSON as UTF-8 bytes: a unicode array would spend 4 bytes a character."""
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def json_of(array):
    return json.loads(array.tobytes().decode())


def minmax_quantize(x, bits, per_channel, range_dtype=torch.float32):
    """(codes, lo, hi): codes = round((x - lo) / (hi - lo) * (2^bits - 1)) in float64, per
    tensor (one row) or per output channel (one row each), with lo/hi as the file stores them
    (range_dtype). The one place the quantization arithmetic lives: files and fake
    quantization both use it, so a decoded file computes exactly what QAT evaluated."""
    rows = x.detach().double().reshape(x.shape[0] if per_channel else 1, -1)
    lo, hi = rows.min(1).values.to(range_dtype), rows.max(1).values.to(range_dtype)
    lo64, hi64 = lo.double()[:, None], hi.double()[:, None]
    span = torch.where(hi64 > lo64, hi64 - lo64, torch.ones_like(lo64))  # a constant row codes as 0
    levels = 2 ** bits - 1
    return torch.round((rows - lo64) / span * levels).clamp_(0, levels), lo, hi


def dequantize(q, lo, hi, bits, shape, dtype=torch.float32):
    """The values codes q (rows x n, float64) stand for: q / (2^bits - 1) * (hi - lo) + lo."""
    lo64, hi64 = lo.double()[:, None], hi.double()[:, None]
    return (q / (2 ** bits - 1) * (hi64 - lo64) + lo64).to(dtype).reshape(shape)


def decode(arrays):
    """The state_dict of encode(): codes back to floats, float16 back to float32."""
    meta = json_of(arrays["meta"])
    mixed, per_channel = meta["bits"] == "mixed", meta["per_channel"]
    specs = meta["tensors"]
    if not mixed:
        q_count = sum(math.prod(s["shape"]) for s in specs if s["store"] == "q")
        codes = unpack_bits(arrays["q"], meta["bits"], q_count) if q_count else None
    offsets = {"ints": 0, "f16": 0, "q": 0, "range": 0}
    sd = {}
    for s in specs:
        n, shape, store = math.prod(s["shape"]), s["shape"], s["store"]
        dtype = getattr(torch, s["dtype"])
        start = offsets[store]
        if store == "ints":
            offsets[store] += n
            sd[s["name"]] = torch.from_numpy(arrays["ints"][start:start + n].copy()).to(dtype).reshape(shape)
            continue
        if store == "f16":
            offsets[store] += n
            sd[s["name"]] = torch.from_numpy(arrays["f16"][start:start + n].astype(np.float32)).to(dtype).reshape(shape)
            continue
        bits = s["bits"] if mixed else meta["bits"]
        if mixed:  # each tensor's codes packed on their own
            offsets[store] += math.ceil(n * bits / 8)
            q = unpack_bits(arrays["q"][start:offsets[store]], bits, n)
        else:
            offsets[store] += n
            q = codes[start:start + n]
        rows = shape[0] if per_channel and len(shape) >= 2 else 1
        r = offsets["range"]
        offsets["range"] += rows
        lo, hi = (torch.from_numpy(arrays[k][r:r + rows].copy()) for k in ("lo", "hi"))
        sd[s["name"]] = dequantize(torch.from_numpy(q.astype(np.float64)).reshape(rows, -1), lo, hi, bits, shape, dtype)
    return sd


decode16 = decode8 = decode


def concat(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def pack_bits(codes, bits):
    """Codes of `bits` bits each into a dense byte string (8-bit codes stay as they are)."""
    if bits == 8:
        return codes
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.packbits(((codes[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_bits(packed, bits, count):
    if bits == 8:
        return packed[:count]
    bitmat = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    return bitmat.astype(np.uint16) @ (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)


# ============================================================================================
# Files: .npz with the arch and preprocessing inside
# ============================================================================================

def save_quantized(path, arrays, arch, preprocess, compressed=False):
    meta = {**json_of(arrays["meta"]), "arch": arch, "preprocess": preprocess}
    arrays = {**arrays, "meta": json_array(meta)}
    save = np.savez_compressed if compressed else np.savez
    common.atomic_write(path, lambda f: save(f, **arrays))


def load_quantized(path):
    """(model, preprocess) from a quantized .npz, without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json_of(arrays["meta"])
        model = common.build_model(meta["arch"])
        model.load_state_dict(decode(arrays))
    except FileNotFoundError:
        raise common.UserError(f"{path}: not found; run 04_quantize.py first") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile) as e:
        raise common.UserError(f"{path}: not a quantized model file ({str(e).splitlines()[0][:100]})") from None
    return model, {"norm": common.STUDENT_NORM, **meta.get("preprocess", {})}


SELECT_COLUMN = "selection acc [95% CI]"
VARIANT_PATTERN = r"fp16|q[1-8]c?|mix[1-8]"


def layout_of(variant, state_dict):
    """(bits, per_channel, plan) of a variant: fp16; qN, N bits per tensor; qNc, per output
    channel; mixN, the pointwise convs (most of the weights) at N bits per channel and every
    other tensor (first conv, depthwise convs, BatchNorms, biases, classifier) at 8."""
    if variant == "fp16":
        return 16, False, None
    if variant.startswith("mix"):
        low = int(variant[3:])
        return 8, True, {name: low for name in state_dict if re.fullmatch(r"cnn\.\d+\.3\.weight", name)}
    return int(variant[1]), variant.endswith("c"), None


def parse_list(text, name, pattern=None, allow_empty=False):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if (not items and not allow_empty) or (pattern and not all(re.fullmatch(pattern, t) for t in items)):
        raise common.UserError(f"--{name}={text!r}: give a comma-separated list"
                               + (" of fp16, qN, qNc or mixN (N = 1..8)" if pattern else ""))
    return items


# ============================================================================================
# Quantization-aware fine-tuning: train through the codes the file will hold
# ============================================================================================

class FakeQuant(common.StudentNet):
    """A StudentNet whose forward sees its tensors as `variant`'s file will store them (the
    same min-max codes, by minmax_quantize); a straight-through estimator hands each weight
    the gradient of its quantized value. In eval mode the BatchNorm statistics are quantized
    too, so its logits are the decoded file's. Its state_dict is a plain StudentNet's."""

    def __init__(self, model, variant):
        super().__init__(widths=model.widths, num_classes=model.fc[0].out_features)
        self.load_state_dict(model.state_dict())
        self.bits, self.per_channel, self.plan = layout_of(variant, self.state_dict())

    def quantized(self, name, t, range_dtype):
        bits = (self.plan or {}).get(name, self.bits)
        per_channel = self.per_channel and t.ndim >= 2
        on = t.device if t.device.type != "mps" else torch.device("cpu")  # float64 arithmetic: not on MPS
        q, lo, hi = minmax_quantize(t.to(on), bits, per_channel, range_dtype)
        return dequantize(q, lo, hi, bits, t.shape, t.dtype).to(t.device)

    def forward(self, x):
        range_dtype = ranges_dtype(self.state_dict().values(), self.per_channel)
        state = {n: p + (self.quantized(n, p, range_dtype) - p).detach() for n, p in self.named_parameters()}
        if not self.training:
            state.update({n: self.quantized(n, b, range_dtype) for n, b in self.named_buffers()
                          if b.is_floating_point()})

        def part(prefix):
            return {n.removeprefix(prefix): v for n, v in state.items() if n.startswith(prefix)}
        features = functional_call(self.cnn, part("cnn."), (x,))
        return functional_call(self.fc, part("fc."), (features.flatten(1),))


# ============================================================================================
# The frontier: bytes against accuracy
# ============================================================================================

def pareto(rows):
    """Marks rows that no other row beats: at most as many bytes and at least as accurate
    (validation), better in one."""
    for r in rows:
        r["front"] = "*" if not any(o["bytes"] <= r["bytes"] and o["val"].acc >= r["val"].acc
                                    and (o["bytes"], o["val"].acc) != (r["bytes"], r["val"].acc)
                                    for o in rows) else ""
    return rows


PLOT_SIZE = (900, 560)  # width, height


def plot_frontier(path, rows, kd, final):
    """Validation accuracy against file bytes (log scale): every file grey, the front blue and
    joined, the final file ringed red, student_kd's accuracy a red line."""
    width, height = PLOT_SIZE
    left, right, top, bottom = 80, width - 30, 40, height - 90
    img = np.full((height, width, 3), 255, np.uint8)
    y_ticks = common.nice_ticks(min([kd.acc] + [r["val"].acc for r in rows]), max([kd.acc] + [r["val"].acc for r in rows]))
    x_ticks = log_ticks(min(r["bytes"] for r in rows), max(r["bytes"] for r in rows))
    decimals = max(2, -math.floor(math.log10(y_ticks[1] - y_ticks[0])))
    lx = [math.log10(x_ticks[0]), math.log10(x_ticks[-1])]

    def at(b, acc):
        return (round(left + (math.log10(b) - lx[0]) / (lx[1] - lx[0]) * (right - left)),
                round(bottom - (acc - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)))
    for y in y_ticks:
        cv2.line(img, at(x_ticks[0], y), at(x_ticks[-1], y), common.GRID, 1)
        common.text(img, f"{y:.{decimals}f}", (left - 12 - 9 * decimals, at(x_ticks[0], y)[1] + 5))
    for x in x_ticks:
        cv2.line(img, at(x, y_ticks[0]), at(x, y_ticks[-1]), common.GRID, 1)
        label = f"{x / 1000:,.0f}k" if x >= 1000 else f"{x:,.0f}"
        common.text(img, label, (at(x, y_ticks[0])[0] - 4 * len(label), bottom + 20))
    cv2.rectangle(img, (left, top), (right, bottom), common.INK, 1)
    common.text(img, "validation accuracy vs file bytes (log scale)", (left, top - 14), 0.55)
    common.text(img, "file bytes", ((left + right) // 2 - 40, bottom + 45))
    kd_y = at(x_ticks[0], kd.acc)[1]
    cv2.line(img, (left, kd_y), (right, kd_y), common.RED, 1, cv2.LINE_AA)
    common.text(img, "student_kd", (right - 90, kd_y - 6))
    front = sorted((r for r in rows if r["front"]), key=lambda r: r["bytes"])
    for a, b in zip(front, front[1:]):
        cv2.line(img, at(a["bytes"], a["val"].acc), at(b["bytes"], b["val"].acc), common.BLUE, 1, cv2.LINE_AA)
    for r in rows:
        cv2.circle(img, at(r["bytes"], r["val"].acc), 5 if r["front"] else 4,
                   common.BLUE if r["front"] else common.GREY, -1, cv2.LINE_AA)
    for r in front:
        x, y = at(r["bytes"], r["val"].acc)
        common.text(img, r["label"], (x + 7, y - 7), 0.4)
    cv2.circle(img, at(final["bytes"], final["val"].acc), 10, common.RED, 2, cv2.LINE_AA)
    common.text(img, "blue: the front (no file smaller and more accurate)    grey: the rest    red ring: the final file",
                (left, height - 15))
    common.atomic_write(path, lambda f: f.write(cv2.imencode(".png", img)[1].tobytes()))


def log_ticks(lo, hi):
    """Ticks at 1, 2 and 5 times powers of ten covering [lo, hi]."""
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    first = max(t for t in ticks if t <= lo)
    last = min(t for t in ticks if t >= hi)
    return [t for t in ticks if first <= t <= last]


# ============================================================================================
# Quantize, fine-tune, measure, choose the final model
# ============================================================================================

def main():
    cfg = common.configure(globals())
    variants = parse_list(cfg.variants, "variants", VARIANT_PATTERN)
    qat_variants = parse_list(cfg.qat_variants, "qat_variants", VARIANT_PATTERN, allow_empty=True)
    if "fp16" in qat_variants:
        raise common.UserError("--qat_variants: fp16 has no codes to train through; give qN, qNc or mixN")
    qat_names = parse_list(cfg.qat_models, "qat_models", allow_empty=True) if qat_variants else []
    names = list(dict.fromkeys(parse_list(cfg.models, "models") + qat_names))  # QAT's starts get PTQ rows too
    variants = list(dict.fromkeys(variants + qat_variants))  # so QAT is compared at the same bits
    ckpt_dir = common.ensure_writable(cfg.ckpt_dir)
    recorded = common.adopt_from(cfg, ckpt_dir / "student_kd.pt", "02_distill.py")
    if "qat_models" in cfg.given:  # named on the command line: it must be there
        for name in qat_names:
            common.require(ckpt_dir / f"{name}.pt", "03_prune.py" if "pruned" in name else "02_distill.py")
    common.adopt_teacher_settings(cfg, recorded["metrics"], cfg.qat_epochs)
    qat_paths = {(name, v): ckpt_dir / f"{name}.qat.{v}.pt" for name in qat_names for v in qat_variants
                 if (ckpt_dir / f"{name}.pt").exists()}
    common.check_resume(cfg, *qat_paths.values())
    common.teacher_note(ckpt_dir)  # a damaged note is said now
    data = common.data_for(cfg, recorded=recorded)
    device = common.pick_device(cfg.device)
    score = common.Scorer(data, cfg, device)

    def load(name):
        """(model, its preprocessing with any sizes given on the command line, its metrics)."""
        made_by = "03_prune.py" if "pruned" in name else "02_distill.py"
        model, preprocess, metrics = common.load_model(ckpt_dir / f"{name}.pt", "student", data.num_classes,
                                                       made_by=made_by)
        if name != "student_kd":  # student_kd's selection was checked when the data was loaded
            common.check_selection(data, preprocess, f"{name}.pt")
        return model, common.as_given(cfg, preprocess), metrics

    kd, kd_preprocess, _ = load("student_kd")
    kd_val, kd_select = score.both(kd, kd_preprocess)  # the reference every file is held to
    rows, records, outputs = [], [], []  # rows: one per model and variant, the files' sizes and scores

    def quantize(name, variant, model, preprocess):
        """Write `name.variant` (.npz and zipped .z.npz), score what decodes from it, note its row."""
        arrays = encode(common.cpu_state_dict(model), *layout_of(variant, model.state_dict()))
        plain, packed = ckpt_dir / f"{name}.{variant}.npz", ckpt_dir / f"{name}.{variant}.z.npz"
        save_quantized(common.new_path(plain), arrays, common.arch_of(model), preprocess)
        save_quantized(common.new_path(packed), arrays, common.arch_of(model), preprocess, compressed=True)
        decoded, _ = load_quantized(common.new_path(plain))
        val, select = score.both(decoded, preprocess)
        sizes = common.file_bytes(common.new_path(plain)), common.file_bytes(common.new_path(packed))
        rows.append({"model": name, "variant": variant, "bytes_plain": sizes[0], "bytes_zip": sizes[1],
                     "bytes": min(sizes), "path": plain if sizes[0] <= sizes[1] else packed,
                     "val": val, "select": select})
        records.append(common.model_record("4 quantization", f"{name}.{variant}", decoded, common.new_path(plain),
                                           val, preprocess.get("img_size", cfg.img_size), bytes_zip=sizes[1],
                                           select_acc=round(select.acc, 4), chosen_on=data.chosen_on))
        outputs.extend([plain, packed])

    # --- post-training quantization ----------------------------------------------------------
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.exists() and name != "student_kd":
            print(f"{path.name} not found; skipped")
            continue
        model, preprocess, _ = load(name)
        val, select = (kd_val, kd_select) if name == "student_kd" else score.both(model, preprocess)
        rows.append({"model": name, "variant": "fp32 .pt", "bytes": common.file_bytes(path), "path": path,
                     "val": val, "select": select})
        for variant in variants:
            quantize(name, variant, model, preprocess)

    # --- quantization-aware fine-tuning ------------------------------------------------------
    loss = asked = None
    if qat_paths and cfg.use_teacher and (ckpt_dir / common.TEACHER_FILE).exists():
        asked = common.teacher_for(cfg, ckpt_dir, data, device, range(min(cfg.teacher_views, cfg.qat_epochs)))
        loss = common.distill_loss(asked, cfg.temperature, cfg.alpha)
    for (name, variant), path in qat_paths.items():
        model, preprocess, _ = load(name)
        print(f"\nQAT: {name} through {variant}'s codes, {cfg.qat_epochs} epochs "
              f"({'distillation' if loss else 'cross-entropy'}, lr {cfg.qat_lr})")
        common.fit(FakeQuant(model, variant), data, cfg.but(epochs=cfg.qat_epochs, lr=cfg.qat_lr), path,
                   norm=preprocess["norm"], loss_fn=loss, desc=f"QAT {variant}")
        quantize(f"{name}.qat", variant, common.load_model(common.new_path(path))[0], preprocess)
        outputs.append(path)
    if asked:
        print(f"the teacher saw {asked.images:,} training images in this run")

    # --- the frontier, and the final model: the smallest file within max_acc_drop of student_kd on selection
    pareto(rows)
    fits = [r for r in rows if r["select"].acc >= kd_select.acc - cfg.max_acc_drop]
    if not fits:
        common.warn(f"no file is within max_acc_drop={cfg.max_acc_drop} of student_kd ({kd_select.acc:.4f} "
                    "on the selection split); taking the most accurate one there")
    final = min(fits, key=lambda r: (r["bytes"], -r["select"].acc)) if fits else max(rows, key=lambda r: r["select"].acc)
    table = [{"file": r["path"].name, "bytes": r["bytes"], common.VAL_COLUMN: r["val"], SELECT_COLUMN: r["select"],
              "front": r["front"], "final": "<-" if r is final else ""} for r in sorted(rows, key=lambda r: r["bytes"])]
    print(f"\nevery file, smallest first (accuracy after decoding, fp32; validation {kd_val.n} images, selection "
          f"{len(data.select.labels)}; front: no smaller file is as accurate on validation)")
    print(common.format_table(table, list(table[0])))
    print_qat_gain(rows, qat_paths)
    print(f"\nfinal model, chosen on {data.chosen_on}: {final['path'].name}: {final['bytes']:,} bytes, "
          f"val acc {final['val']} (selection {final['select'].acc:.4f}; student_kd {kd_select.acc:.4f} there, "
          f"allowed drop {cfg.max_acc_drop})")
    plot = ckpt_dir / "frontier.png"
    for r in rows:
        r["label"] = f"{r['model']}.{r['variant']}".replace("student_", "")
    plot_frontier(common.new_path(plot), rows, kd_val, final)
    records.append({"stage": "4 quantization", "model": "final", "file": final["path"].name,
                    "bytes": final["bytes"], **common.score_fields(final["val"]),
                    "select_acc": round(final["select"].acc, 4), "chosen_on": data.chosen_on})
    outputs += write_submission(final["path"], final["path"] in outputs, data, cfg, ckpt_dir, device)
    outputs.append(plot)
    written = common.publish(ckpt_dir, outputs, records, finished=map(common.resume_path, qat_paths.values()))
    print_summary(ckpt_dir, data)
    print(f"\nwrote {len(outputs)} files in {ckpt_dir} (*.npz, *.z.npz, frontier.png"
          + (", predictions.csv" if data.test is not None else "") + f") and {written[-1]}")


def print_qat_gain(rows, qat_paths):
    """What quantization-aware fine-tuning bought: each QAT file against post-training
    quantization of the same model at the same layout, on the same validation images."""
    by = {(r["model"], r["variant"]): r for r in rows}
    pairs = [common.paired_row(f"{name}.{v} (post-training)", by[name, v]["val"], f"{name}.qat.{v}",
                               by[f"{name}.qat", v]["val"]) for name, v in qat_paths]
    if pairs:
        print("\nquantization-aware fine-tuning against post-training quantization, same model and bits")
        print(common.format_table(pairs, list(pairs[0])))


def write_submission(path, written_now, data, cfg, ckpt_dir, device):
    """predictions.csv (as a .new file) from the final model, read from its .new file when this
    run wrote it; returns what to publish."""
    if data.test is None:
        common.warn(f"{data.root} has no testing/ split; no predictions written")
        return []
    source = common.new_path(path) if written_now else path
    model, preprocess = load_quantized(source) if path.suffix == ".npz" else common.load_model(source)[:2]
    test, crop = data.test, preprocess.get("img_size", cfg.img_size)
    stored = common.storage(preprocess.get("resize", common.resize_of(cfg)), crop)
    if stored != common.storage(common.resize_of(cfg), cfg.img_size):
        test = common.load_split(cfg.data_dir, "testing", stored[0], False, cfg.get("cache_dir"), stored[1])
    preds = common.predict(common.prepare(model, device), test.images.to(device), cfg.batch_size, crop,
                           preprocess["norm"])
    out = ckpt_dir / "predictions.csv"
    count, unreadable = common.write_predictions(common.new_path(out), test, preds)
    print(f"predictions for {count} testing images -> {out}"
          + (f" ({unreadable} unreadable images given class 0)" if unreadable else ""))
    return [out]


def print_summary(ckpt_dir, data):
    """Every stage's record, then each stage against the one before on the same images."""
    records = common.read_results(ckpt_dir)
    rows = [{**r, common.VAL_COLUMN: common.recorded_score(r) or r.get("val_acc")}
            for r in sorted(records, key=lambda r: str(r.get("stage"))) if r["model"] != "final"]
    print(f"\nevery stage ({Path(ckpt_dir) / common.RESULTS}; validation reports, {data.chosen_on} chose)")
    print(common.format_table(rows, ["stage", "model", "params", "bytes", "bytes_zip", "macs", common.VAL_COLUMN]))
    by_name = {r["model"]: r for r in records}
    final_name = f"final file ({by_name.get('final', {}).get('file', '?')})"
    steps = [("student_scratch", "student_kd"), ("student_kd", "student_pruned"), ("student_pruned", "final"),
             ("student_kd", "final")]  # the last: what the whole of compression cost
    pairs = []
    for a, b in steps:
        sa, sb = (common.recorded_score(by_name[m]) if m in by_name else None for m in (a, b))
        if sa is None or sb is None or sa.key != sb.key or sa.n != sb.n:
            continue  # a stage not run, or scored on other images
        pairs.append(common.paired_row(a, sa, final_name if b == "final" else b, sb))
    if pairs:
        print(f"\neach stage against the one before, and the final file against student_kd, on the same "
              f"{data.val.labels.numel()} validation images (paired bootstrap interval, exact McNemar test)")
        print(common.format_table(pairs, list(pairs[0])))


if __name__ == "__main__":
    common.run(main)
