"""Stage 1 - architecture design: the MobileNet-v1 student beside the ResNet18 teacher.

Prints parameters, fp32 bytes, MACs, CPU latency and throughput of both models, the student's
per-block table, then trains the student from scratch (no teacher) and saves
checkpoints/student_scratch.pt: the baseline every later stage must beat.

    python 01_architecture.py                      # Food-11 in data/food-11, or the sample
    python 01_architecture.py --img_size=128 --epochs=10 --data_dir=../shared/data/food101-10
"""
import time

import common  # first: Ctrl-C during the slow imports is then a clean exit
import torch

from support import files, reports
from support.resume import Resumable, check_resume
from support.running import run
from support.settings import configure, describe_preprocess, pick_device, resize_of

# --- settings (each can be overridden as --name=value) -------------------------------------
recipe = "ours"  # ours, or course: the homework's choices (support/presets/course.py) for every setting you leave alone
img_size = 224  # crop size fed to the models (pixels)
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale (no resizing)
norm = "imagenet"  # the student's input normalisation: imagenet (ours) or none ([0,1], the course's)
rotate = 10.0  # training augmentation: random rotation up to this many degrees
jitter = 0.1  # training augmentation: brightness/contrast/saturation jitter
mix = "cutmix"  # mix each training view with a partner image's: none, mixup or cutmix (labels mixed alike); 02's views, for a fair comparison
mix_alpha = 1.0  # mixup's own share is drawn from Beta(mix_alpha, mix_alpha); CutMix's box covers 1 - such a share
batch_size = 64  # images per training step
epochs = 40  # training epochs from scratch
lr = 3e-3  # peak learning rate (AdamW)
schedule = "onecycle"  # learning-rate schedule: onecycle (ours) or constant (the course's)
weight_decay = 0.05  # AdamW weight decay
label_smoothing = 0.0  # cross-entropy label smoothing
base = 16  # student base width
width_mult = 1.0  # student width multiplier of blocks 3-6
select_fraction = 0.1  # share of training held out (per class) as the selection split, on which 03 and 04 choose; 0 = validation (optimistic)
seed = 0  # random seed (weights, batch order, augmentation)
bench = True  # time CPU latency and throughput of both models

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off
resume = False  # continue an interrupted run from its resumable state


SINGLE_RUNS, BATCH_RUNS = 11, 5


@torch.no_grad()
def cpu_speed(model, img_size):
    """Seconds of each timed forward pass on the CPU: ([SINGLE_RUNS at batch 1], [BATCH_RUNS at 32])."""
    model = model.cpu().eval().to(memory_format=torch.channels_last)

    def seconds(x, n):
        model(x)  # warm-up
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        return sorted(times)
    one = torch.rand(1, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    many = torch.rand(32, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    return seconds(one, SINGLE_RUNS), seconds(many, BATCH_RUNS)


def compare(models, cfg):
    """models: name -> (model, the object its file holds). Bytes are those of that file."""
    rows = []
    for name, (model, saved) in models.items():
        row = {"model": name, "params": common.count_params(model), "file bytes": files.saved_bytes(saved),
               "MACs": common.count_macs(model, cfg.img_size)}
        if cfg.bench:
            one, many = cpu_speed(model, cfg.img_size)
            row[f"cpu ms @1 (median, min-max of {SINGLE_RUNS})"] = \
                f"{1000 * one[len(one) // 2]:.2f} ({1000 * one[0]:.2f}-{1000 * one[-1]:.2f})"
            row[f"cpu img/s @32 (median, min-max of {BATCH_RUNS})"] = \
                f"{32 / many[len(many) // 2]:.0f} ({32 / many[-1]:.0f}-{32 / many[0]:.0f})"
        rows.append(row)
    print(f"\nstudent vs teacher at {cfg.img_size} px (file bytes: the student's .pt as this stage writes it, "
          "the teacher's .bin in the course's format)")
    print(reports.format_table(rows, list(rows[0])))


def block_table(model):
    """The course's per-block table: one row per layer that has weights."""
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or list(module.children()):
            continue
        kind = type(module).__name__
        if kind == "Conv2d" and module.groups > 1:
            kind = "Conv2d depthwise"
        elif kind == "Conv2d" and module.kernel_size == (1, 1):
            kind = "Conv2d pointwise"
        rows.append({"layer": name, "kind": kind, "weight": "x".join(map(str, weight.shape)),
                     "params": sum(p.numel() for p in module.parameters(recurse=False))})
    rows.append({"layer": "total", "kind": "", "weight": "", "params": common.count_params(model)})
    print("\nstudent layers")
    print(reports.format_table(rows, list(rows[0])))


def main():
    cfg = configure(globals())
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    path = ckpt_dir / "student_scratch.pt"
    check_resume(cfg, path)
    data = common.data_for(cfg, splits=("training", "validation"))
    device = pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    student = common.StudentNet(cfg.base, cfg.width_mult, data.num_classes)
    teacher = common.make_teacher(data.num_classes)
    preprocess = {"norm": cfg.norm, "img_size": cfg.img_size, "resize": resize_of(cfg), **data.selection}
    # channels_last, as fit() trains and saves it: the tensors' strides are part of the file
    as_saved = common.checkpoint(common.prepare(student, "cpu"), preprocess, common.epoch_metrics(views=cfg.epochs))
    compare({"student": (student, as_saved),
             "teacher (ResNet18)": (teacher, common.cpu_state_dict(teacher))}, cfg)
    block_table(student)

    print(f"\ntraining the student from scratch for {cfg.epochs} epochs")
    best = common.fit(student, data, common.cross_entropy(cfg.label_smoothing),
                      epochs=cfg.epochs, lr=cfg.lr, schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                      batch_size=cfg.batch_size, augment=common.augment_of(cfg),
                      norm=cfg.norm, device=device, out=Resumable(path, cfg), desc="scratch",
                      notes={"mix": cfg.mix, "mix_alpha": cfg.mix_alpha})
    model, preprocess, _ = common.load_model(files.new_path(path))
    val = common.Scorer(data, cfg, device)(model, preprocess)
    record = common.model_record("1 architecture", "student_scratch", model, files.new_path(path), val,
                                 cfg.img_size, select_acc=round(best["select_acc"], 4),
                                 seed=cfg.seed)
    print(f"\nscratch student: val acc {val} (the last of {best['epoch']} epochs; "
          f"{describe_preprocess(preprocess, cfg)})")
    files.say_written(files.publish(ckpt_dir, [path], [record], finished=[Resumable(path, cfg).state]))


if __name__ == "__main__":
    run(main)
