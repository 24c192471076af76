"""Stage 3 - network pruning by network slimming (Liu et al. 2017).

A BatchNorm gamma says how much its channel matters. Channel group g (1..7) is the set of
channels entering block g: made by the previous block's last conv, used by block g's depthwise
conv, BatchNorm and pointwise conv. slim() drops a group's weakest channels by real surgery on
those weights and returns a physically smaller StudentNet.

Prunes prune_count times, each time independently from student_kd.pt, keeping
prune_rate**k of the channels in round k, and fine-tunes each pruned model (a fresh optimizer
on its own parameters; the distillation loss when the teacher is there, read from the teacher
bank 02 built, so the teacher is not even loaded when the bank holds the views). The smallest
round close to student_kd on the selection split (its cross-entropy there at most max_loss_rise
above student_kd's) is saved as checkpoints/student_pruned.pt.

    python 03_prune.py
    python 03_prune.py --method=global --sparsity=1e-4 --sparsity_epochs=3
"""
import common  # first: Ctrl-C during the slow imports is then a clean exit
import torch

from support import choose, deploy, files, plots, reports
from support.resume import Resumable, check_resume
from support.running import UserError, run
from support.settings import adopt_from, adopt_teacher_settings, as_given, configure, pick_device

# --- settings (each can be overridden as --name=value) -------------------------------------
recipe = "ours"  # ours, or course: the homework's choices (support/presets/course.py) for every setting you leave alone
img_size = 224  # crop size (pixels); student_kd.pt's record unless you set it
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale; student_kd.pt's record unless you set it
rotate = 10.0  # training augmentation: random rotation up to this many degrees; as student_kd.pt records unless you set it
jitter = 0.1  # training augmentation: brightness/contrast/saturation jitter; as student_kd.pt records unless you set it
mix = "cutmix"  # mix each training view with a partner image's: none, mixup or cutmix (labels mixed alike); as student_kd.pt records unless you set it
mix_alpha = 1.0  # mixup's own share is drawn from Beta(mix_alpha, mix_alpha); CutMix's box covers 1 - such a share; as student_kd.pt records unless you set it
batch_size = 64  # images per training step
prune_rate = 0.8  # round k keeps prune_rate**k of each pruned group's channels
prune_count = 5  # pruning rounds, each from student_kd.pt
prune_groups = "1,2,3,4,5,6,7"  # channel groups that may be pruned (the course pruned 4-7)
channel_multiple = 16  # every kept channel count is rounded to a multiple of this (16: AVX-512's vector width, 4-16% faster there than 8, and a multiple of AVX2's 8); 1 = exact counts
method = "global"  # global: one |gamma| threshold over all groups, at the uniform model's parameter count; uniform: the same fraction per group
finetune_epochs = 8  # fine-tuning epochs after each pruning (on a 40-epoch student 8 leave every round's selection loss lower than 5 or 2; 16 lower it more, not validation: docs/results.md)
lr = 1e-3  # peak fine-tuning learning rate (AdamW)
schedule = "onecycle"  # learning-rate schedule: onecycle (ours) or constant (the course's)
weight_decay = 0.05  # AdamW weight decay
sparsity = 0.0  # L1 weight on BN gammas in a fine-tune before pruning, e.g. 1e-4
sparsity_epochs = 0  # epochs of that sparsity fine-tune (0 = none)
choose_by = "loss"  # student_pruned.pt: the smallest round whose selection loss (cross-entropy) is within max_loss_rise of student_kd's; acc: whose selection accuracy is within max_acc_drop
max_loss_rise = 0.03  # allowed rise of the selection loss over student_kd's, as a fraction (3%: in the gap between adjacent rounds, docs/results.md)
max_acc_drop = 0.01  # allowed drop of the selection accuracy below student_kd's, with choose_by=acc
temperature = 4.0  # distillation temperature for fine-tuning (when the teacher is there); as student_kd.pt records unless you set it
alpha = 1.0  # distillation weight for fine-tuning; as student_kd.pt records unless you set it
use_teacher = True  # fine-tune with the distillation loss when teacher_resnet18.bin exists
teacher_views = 0  # distinct training views (epoch e uses view e mod this); 0 = as many as student_kd.pt was distilled with
teacher_norm = "none"  # input normalisation of a teacher file without a note: none or imagenet; as student_kd.pt records unless you set it
select_fraction = 0.1  # share of training held out to choose rounds; student_kd.pt's record unless you set it
other_selection = False  # allow a selection split other than the one the starting model was made with (it may have trained on its images)
seed = 0  # random seed (batch order, augmentation); as student_kd.pt records unless you set it

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off
teacher_bank = True  # read the teacher's answers from the bank (built where missing); False: ask it on every batch
resume = False  # continue an interrupted run; finished fine-tunes are reused


# ============================================================================================
# The surgery
# ============================================================================================

GROUPS = range(1, 8)
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def importance(model, g):
    """|gamma| of the BatchNorm in block g: one score per channel entering block g."""
    return model.cnn[g][1].weight.detach().abs()


def slim_counts(model, counts):
    """Network slimming: in each group g of `counts`, keep the counts[g] channels whose
    BatchNorm gamma is largest in magnitude and cut the others out of the weights that make,
    normalise and read them; a new, physically smaller StudentNet.

    Exact: a dropped channel whose gamma were 0 would still feed block g's pointwise conv the
    constant ReLU6(beta), so that constant goes into the conv's bias. The slim model computes
    what the original computes with the dropped channels' gammas set to 0 (eval mode)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    widths = list(model.widths)
    for g, count in sorted(counts.items()):
        if not 1 <= count <= widths[g - 1]:
            raise ValueError(f"group {g} has {widths[g - 1]} channels; cannot keep {count}")
        idx = importance(model, g).topk(count).indices.sort().values
        dropped = torch.ones(widths[g - 1], dtype=torch.bool)
        dropped[idx] = False
        constant = sd[f"cnn.{g}.1.bias"][dropped].clamp(0, 6)
        sd[f"cnn.{g}.3.bias"] = sd[f"cnn.{g}.3.bias"] + sd[f"cnn.{g}.3.weight"][:, dropped, 0, 0] @ constant
        producer = ["cnn.0.0.weight", "cnn.0.0.bias"] + [f"cnn.0.1.{k}" for k in BN_KEYS] if g == 1 \
            else [f"cnn.{g - 1}.3.weight", f"cnn.{g - 1}.3.bias"]
        block = [f"cnn.{g}.0.weight", f"cnn.{g}.0.bias"] + [f"cnn.{g}.1.{k}" for k in BN_KEYS]
        for key in producer + block:
            sd[key] = sd[key][idx]
        sd[f"cnn.{g}.3.weight"] = sd[f"cnn.{g}.3.weight"][:, idx]
        widths[g - 1] = count
    slim_model = common.StudentNet(widths=widths, num_classes=model.fc[0].out_features)
    slim_model.load_state_dict(sd)
    return slim_model


def rounded(count, width, multiple):
    """A channel count rounded to the nearest multiple of `multiple` (at least one multiple, at
    most the width): a runtime's vector instructions take 8 channels at a time, and a count
    of 51 runs slower than one of 56."""
    return min(width, max(multiple, multiple * round(count / multiple)))  # a tie goes to the even multiple


def slim(model, keep, groups=GROUPS, multiple=1):
    """Keep round(keep * width) channels (at least 1, rounded to a multiple of `multiple`) in
    each group; keep: one float or one per group."""
    groups = list(groups)
    keeps = [keep] * len(groups) if isinstance(keep, (int, float)) else list(keep)
    if len(keeps) != len(groups):
        raise ValueError(f"{len(keeps)} keep values for {len(groups)} groups")
    counts = {g: rounded(round(k * model.widths[g - 1]), model.widths[g - 1], multiple) for g, k in zip(groups, keeps)}
    return slim_counts(model.cpu(), counts)


def global_counts(model, max_params, groups=GROUPS, multiple=1):
    """Per-group counts from one |gamma| threshold over all groups (the paper's way), each
    rounded to a multiple of `multiple`, as low as it can go while the slim model has at most
    max_params parameters."""
    groups, model = list(groups), model.cpu()
    scores = torch.cat([importance(model, g) for g in groups])
    owner = torch.cat([torch.full((model.widths[g - 1],), g) for g in groups])
    ranked = owner[scores.argsort(descending=True)]

    def counts_for(top):
        return {g: rounded(int((ranked[:top] == g).sum()), model.widths[g - 1], multiple) for g in groups}

    def params(counts):
        widths = list(model.widths)
        for g, c in counts.items():
            widths[g - 1] = c
        return common.count_params(common.StudentNet(widths=widths, num_classes=model.fc[0].out_features))

    lo, hi = 0, len(ranked)  # the largest `top` whose model fits max_params
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if params(counts_for(mid)) <= max_params else (lo, mid - 1)
    return counts_for(lo)


def parse_groups(text):
    try:
        groups = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        groups = []
    if not groups or not set(groups) <= set(GROUPS):
        raise UserError(f"--prune_groups={text!r}: give block numbers from 1 to 7, e.g. 4,5,6,7")
    return groups


# ============================================================================================
# The pruning rounds
# ============================================================================================

def prune_model(base, keep, groups, method, multiple):
    """The round's pruned model: `keep` of each group, or (global) one |gamma| threshold at
    the uniform model's parameter count; channel counts rounded to multiples of `multiple`."""
    model = slim(base, keep, groups, multiple)
    if method == "global":
        model = slim_counts(base, global_counts(base, common.count_params(model), groups, multiple))
    return model


def round_names(keeps):
    """Each round's keep as it names its file: 3 decimals, or as many as keep the names apart."""
    for decimals in range(3, 18):
        names = [f"{keep:.{decimals}f}" for keep in keeps]
        if len(set(names)) == len(names):
            return names
    return [f"{keep:.3f}r{k}" for k, keep in enumerate(keeps, 1)]


def main():
    cfg = configure(globals())
    groups = parse_groups(cfg.prune_groups)
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    kd_path = ckpt_dir / "student_kd.pt"
    recorded = adopt_from(cfg, kd_path, "02_distill.py")
    longest = max(cfg.finetune_epochs, cfg.sparsity_epochs if cfg.sparsity else 0)  # the most views a fine-tune uses
    adopt_teacher_settings(cfg, recorded["metrics"], max(longest, 1))
    sparse_path = ckpt_dir / "student_sparse.pt"
    check_resume(cfg, sparse_path)  # it may say what sparsity the rounds' names carry
    sparse = bool(cfg.sparsity and cfg.sparsity_epochs)
    variant = ("_global" if cfg.method == "global" else "") + ("_sparse" if sparse else "")
    keeps = [cfg.prune_rate ** k for k in range(1, cfg.prune_count + 1)]
    round_paths = [ckpt_dir / f"student_pruned_{name}{variant}.pt" for name in round_names(keeps)]
    check_resume(cfg, *round_paths)
    files.teacher_note(ckpt_dir)  # a damaged note is said now
    data = common.data_for(cfg, splits=("training", "validation"), recorded=recorded)
    kd, preprocess, _ = common.load_model(kd_path, "student", data.num_classes, made_by="02_distill.py")
    preprocess = {**as_given(cfg, preprocess), **data.selection}
    device = pick_device(cfg.device)
    score = common.Scorer(data, cfg, device)
    (kd_val, kd_select), kd_params = score.both(kd, preprocess), common.count_params(kd)
    augment = common.augment_of(cfg)
    loss, asked = common.cross_entropy(), None
    if cfg.use_teacher and longest and (ckpt_dir / files.TEACHER_FILE).exists():
        asked = common.teacher_for(cfg, ckpt_dir, data, augment, device, range(min(cfg.teacher_views, longest)))
        loss = common.distill_loss(asked, cfg.temperature, cfg.alpha)
    print(f"student_kd: {kd_params:,} params, val acc {kd_val}, selection acc {kd_select}, loss {kd_select.loss:.4f}; "
          f"fine-tuning with {'distillation' if asked else 'cross-entropy'}")

    def fine_tune(model, path, epochs, desc, sparsity=0.0):
        """Train `model` (a fresh optimizer on its own parameters); its last epoch, on the CPU."""
        common.fit(model, data, loss, epochs=epochs, lr=cfg.lr, schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                   batch_size=cfg.batch_size, augment=augment, views=cfg.teacher_views, sparsity=sparsity,
                   norm=preprocess["norm"], device=device, out=Resumable(path, cfg), desc=desc)
        return common.load_model(files.new_path(path))[0].cpu()

    # --- optional: push the gammas towards zero first (the paper's L1 sparsity) ------------
    base, outputs = kd.cpu(), []
    if sparse:
        print(f"sparsity fine-tune: {cfg.sparsity_epochs} epochs, L1 {cfg.sparsity} on BN gammas")
        base = fine_tune(kd, sparse_path, cfg.sparsity_epochs, "sparsity", cfg.sparsity)
        print(f"after the sparsity fine-tune: val acc {score(base, preprocess)}")
        outputs = [sparse_path]

    # --- the rounds, each from the same base ------------------------------------------------
    rows, records = [], []
    for k, (keep, path) in enumerate(zip(keeps, round_paths), 1):
        model = prune_model(base, keep, groups, cfg.method, cfg.channel_multiple)
        before = score(model, preprocess)
        print(f"\nround {k}: keep {keep:.3f} ({cfg.method}) -> widths {model.widths}, "
              f"{common.count_params(model):,} params, val acc {before} before fine-tuning")
        if cfg.finetune_epochs:
            model = fine_tune(model, path, cfg.finetune_epochs, f"round {k}")
        else:
            common.save_checkpoint(files.new_path(path), model, preprocess)
        after, select = score.both(model, preprocess)
        rows.append({"keep": round(keep, 3), "params": common.count_params(model),
                     "macs": common.count_macs(model.cpu(), cfg.img_size),
                     "bytes": files.file_bytes(files.new_path(path)),
                     "acc_before": before.acc, "acc_after": after.acc, "ci_after": after.interval(),
                     "select_after": select.acc, "select": select, "select loss": round(select.loss, 4),
                     "val before": before, "val after [95% CI]": after,
                     "selection after": select, "path": path, "score": after, "model": model})
        records.append(common.model_record("3 pruning", path.stem, model, files.new_path(path), after,
                                           cfg.img_size, keep=rows[-1]["keep"], method=cfg.method,
                                           acc_before=round(before.acc, 4), select_acc=round(select.acc, 4),
                                           select_loss=round(select.loss, 4),
                                           chosen_on=data.chosen_on))

    # --- what each round buys in a runtime: ONNX Runtime fp32 at the training batch, interleaved
    ms = deploy.onnx_latency_ms({"student_kd": kd, **dict(enumerate(r["model"] for r in rows))}, cfg.img_size,
                                cfg.batch_size)
    for k, r in enumerate(rows):
        r[f"ms @{cfg.batch_size}"], r["speed x kd"] = f"{ms[k]:.1f}", f"{ms['student_kd'] / ms[k]:.2f}"

    # --- the smallest good-enough round becomes student_pruned.pt ---------------------------
    chosen = choose.smallest_close(rows, lambda r: r["params"], kd_select, cfg, "round")
    final = ckpt_dir / "student_pruned.pt"
    blob = files.new_path(chosen["path"]).read_bytes()
    files.atomic_write(files.new_path(final), lambda f: f.write(blob))
    records.append(common.model_record("3 pruning", "student_pruned", chosen["model"], files.new_path(final),
                                       chosen["score"], cfg.img_size, keep=chosen["keep"], method=cfg.method,
                                       select_acc=round(chosen["select_after"], 4),
                                       select_loss=round(chosen["select"].loss, 4), chosen_on=data.chosen_on))
    print(f"\npruning from student_kd ({kd_params:,} params, val acc {kd_val}, {ms['student_kd']:.1f} ms per "
          f"batch of {cfg.batch_size} in ONNX Runtime), method {cfg.method}"
          f"{', after sparsity training' if sparse else ''}, groups {groups}, channel counts in multiples of "
          f"{cfg.channel_multiple}; the round chosen on {data.chosen_on}")
    print(reports.format_table(rows, ["keep", "params", "macs", "bytes", f"ms @{cfg.batch_size}", "speed x kd",
                                      "val before", "val after [95% CI]", "selection after", "select loss"]))
    print(f"student_pruned.pt = keep {chosen['keep']} ({chosen['params']:,} params, val acc {chosen['score']}; "
          f"selection loss {chosen['select'].loss:.4f} and acc {chosen['select_after']:.4f} against student_kd's "
          f"{kd_select.loss:.4f} and {kd_select.acc:.4f}; {chosen['chosen_by']})")
    plot = ckpt_dir / f"pruning_{cfg.method}{'_sparse' if sparse else ''}.png"
    plots.plot_rounds(files.new_path(plot), rows, {"params": kd_params, "bytes": files.file_bytes(kd_path),
                                                   "acc": kd_val.acc}, chosen)
    if asked:
        print(f"the teacher saw {asked.images:,} training images in this run")
    outputs += round_paths + [final, plot]
    files.say_written(files.publish(ckpt_dir, outputs, records,
                                    finished=[Resumable(p, cfg).state for p in [sparse_path, *round_paths]],
                                    replaces_outputs=True))


if __name__ == "__main__":
    run(main)
