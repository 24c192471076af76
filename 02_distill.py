"""Stage 2 - knowledge distillation: the student learns from the frozen ResNet18 teacher.

Loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y),
the KL taken on the student's log_softmax. The teacher's answer for each view of each training
image is asked once, in inference mode, into a teacher bank (checkpoints/teacher_bank_*.npz) that
03's fine-tunes read too; epoch e trains on view e mod teacher_views. With mix=mixup or cutmix
every view is mixed with a partner image's (function matching, Beyer et al. 2022: the teacher's
logits are of the very picture the student sees; alpha=1 leaves the labels out). Saves the last
epoch's student as checkpoints/student_kd.pt and ends with teacher / scratch student / distilled
student accuracy side by side.

    python 02_distill.py
    python 02_distill.py --data_dir=../shared/data/food101-10 --img_size=112 --teacher_norm=imagenet
"""
import common  # first: Ctrl-C during the slow imports is then a clean exit
from support import files, reports
from support.resume import Resumable, check_resume
from support.running import run
from support.settings import DISTILLED_WITH, adopt_from, configure, course_scale, describe_preprocess, pick_device

# --- settings (each can be overridden as --name=value) -------------------------------------
recipe = "ours"  # ours, or course: the homework's choices (support/presets/course.py) for every setting you leave alone
img_size = 224  # crop size fed to student and teacher (pixels)
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale (no resizing)
norm = "imagenet"  # the student's input normalisation: imagenet (ours) or none ([0,1], the course's)
rotate = 10.0  # training augmentation: random rotation up to this many degrees
jitter = 0.1  # training augmentation: brightness/contrast/saturation jitter
mix = "cutmix"  # mix each training view with a partner image's: none, mixup or cutmix (labels mixed alike)
mix_alpha = 1.0  # mixup's own share is drawn from Beta(mix_alpha, mix_alpha); CutMix's box covers 1 - such a share
batch_size = 64  # images per training step
epochs = 40  # distillation epochs
lr = 3e-3  # peak learning rate (AdamW)
schedule = "onecycle"  # learning-rate schedule: onecycle (ours) or constant (the course's)
weight_decay = 0.05  # AdamW weight decay
temperature = 4.0  # softmax temperature T of the distillation term
alpha = 1.0  # weight of the distillation term (1 - alpha goes to cross-entropy); 1: function matching, the teacher's output only
sparsity = 0.0  # L1 weight on BatchNorm gammas (network slimming); e.g. 1e-4
teacher_views = 0  # distinct training views (epoch e uses view e mod this); 0 = as many as the epochs
from_scratch = True  # start the student from random weights, not from student_scratch.pt
teacher_norm = "none"  # input normalisation of a teacher file without a note: none ([0,1], the course's) or imagenet
base = 16  # student base width (when from_scratch)
width_mult = 1.0  # student width multiplier of blocks 3-6 (when from_scratch)
select_fraction = 0.1  # share of training held out (per class) as the selection split, on which 03 and 04 choose; 0 = validation (optimistic)
other_selection = False  # allow a selection split other than the one the starting model was made with (it may have trained on its images)
seed = 0  # random seed (weights, batch order, augmentation)

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off
teacher_bank = True  # ask the teacher once per view of each image into a bank; False: on every batch
resume = False  # continue an interrupted run from its resumable state


def main():
    cfg = configure(globals())
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    path, scratch_path = ckpt_dir / "student_kd.pt", ckpt_dir / "student_scratch.pt"
    files.require(ckpt_dir / files.TEACHER_FILE, "00_teacher.py")
    files.teacher_note(ckpt_dir)  # a damaged note is said now
    if not cfg.from_scratch:
        scratch_record = adopt_from(cfg, scratch_path, "01_architecture.py", names=("select_fraction",))
    course_scale(cfg, ckpt_dir)
    check_resume(cfg, path)
    data = common.data_for(cfg, splits=("training", "validation"), recorded=None if cfg.from_scratch else scratch_record)
    device = pick_device(cfg.device)
    teacher, norm = common.load_teacher(ckpt_dir, data.num_classes, cfg.teacher_norm)
    teacher = common.prepare(teacher, device)
    score = common.Scorer(data, cfg, device)
    teacher_val = score(teacher, {"norm": norm})
    print(f"teacher: val acc {teacher_val} ({describe_preprocess({'norm': norm}, cfg)})")

    common.seed_everything(cfg.seed)
    if cfg.from_scratch:
        student = common.StudentNet(cfg.base, cfg.width_mult, data.num_classes)
    else:
        student = common.load_model(scratch_path, "student", data.num_classes, made_by="01_architecture.py")[0]
    augment = common.augment_of(cfg)
    views = min(cfg.teacher_views or cfg.epochs, cfg.epochs)
    asked = common.teacher_for(cfg, ckpt_dir, data, augment, device, range(views), loaded=(teacher, norm))
    print(f"distilling for {cfg.epochs} epochs (T={cfg.temperature}, alpha={cfg.alpha}, sparsity={cfg.sparsity})")
    best = common.fit(student, data, common.distill_loss(asked, cfg.temperature, cfg.alpha),
                      epochs=cfg.epochs, lr=cfg.lr, schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                      batch_size=cfg.batch_size, augment=augment, views=cfg.teacher_views, sparsity=cfg.sparsity,
                      norm=cfg.norm, device=device, out=Resumable(path, cfg), desc="distill",
                      notes={"teacher_norm": norm, **{k: cfg[k] for k in DISTILLED_WITH[1:]}})
    print(f"the teacher saw {asked.images:,} training images in this run")
    student, preprocess, _ = common.load_model(files.new_path(path))
    kd_val = score(student, preprocess)
    record = common.model_record("2 distillation", "student_kd", student, files.new_path(path), kd_val,
                                 cfg.img_size, select_acc=round(best["select_acc"], 4),
                                 seed=cfg.seed, temperature=cfg.temperature, alpha=cfg.alpha,
                                 teacher_sha1=files.teacher_sha1(ckpt_dir / files.TEACHER_FILE),
                                 **({} if cfg.from_scratch else {"start": "student_scratch"}))

    def table_row(name, val, seen):
        return {"model": name, "sees": describe_preprocess(seen, cfg), reports.VAL_COLUMN: val}
    rows = [table_row("teacher (ResNet18)", teacher_val, {"norm": norm})]
    scratch_val = None
    if scratch_path.exists():
        scratch, scratch_preprocess, scratch_metrics = common.load_model(scratch_path, "student")
        scratch_val = score(scratch, scratch_preprocess)
        scratch_mix = scratch_metrics.get("mix", cfg.mix)  # a fair comparison trains both on the same views
        rows.append(table_row("student from scratch" + (f" (mix={scratch_mix})" if scratch_mix != cfg.mix else ""),
                              scratch_val, scratch_preprocess))
    rows.append(table_row("distilled student", kd_val, preprocess))
    print(f"\nvalidation accuracy ({kd_val.n} images; each model's last epoch)")
    print(reports.format_table(rows, list(rows[0])))
    if scratch_val is not None:
        print("\ndistilled vs scratch on the same images")
        row = reports.paired_row("scratch", scratch_val, "distilled", kd_val)
        print(reports.format_table([row], list(row)))
    files.say_written(files.publish(ckpt_dir, [path], [record], finished=[Resumable(path, cfg).state]))


if __name__ == "__main__":
    run(main)
