"""Stage 0 - the teacher: a torchvision ResNet18 every user can get.

If checkpoints/teacher_resnet18.bin exists (the course's trained file, the shared food101-10
one, or one this script wrote), evaluate it on validation and stop. Otherwise train one:
from ImageNet weights when torchvision can load them, else from scratch (as on machines
without internet), and save the weights of its last epoch (a one-cycle schedule ends where it
converged) in the course's format (a plain state_dict) with a JSON note of the
preprocessing it was trained with.

    python 00_teacher.py
    python 00_teacher.py --data_dir=../shared/data/food101-10 --img_size=112 --teacher_norm=imagenet
"""
import common  # first: Ctrl-C during the slow imports is then a clean exit
import torchvision

from support import files
from support.resume import Resumable, check_resume
from support.running import run
from support.settings import configure, course_scale, describe_preprocess, pick_device

# --- settings (each can be overridden as --name=value) -------------------------------------
img_size = 224  # crop size fed to the teacher (pixels)
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale (the course teacher file gets it by default)
rotate = 10.0  # training augmentation: random rotation up to this many degrees
jitter = 0.1  # training augmentation: brightness/contrast/saturation jitter
batch_size = 64  # images per training step
epochs = 30  # training epochs when no teacher file exists
lr = 2e-3  # peak learning rate (AdamW, one-cycle schedule)
weight_decay = 0.05  # AdamW weight decay
label_smoothing = 0.1  # cross-entropy label smoothing
teacher_norm = "none"  # input normalisation of a teacher file without a note: none ([0,1], the course's) or imagenet
pretrained = True  # start from ImageNet weights when torchvision can load them
select_fraction = 0.1  # share of training held out (per class) as the selection split, on which 03 and 04 choose; 0 = validation (optimistic)
seed = 0  # random seed (weights, batch order, augmentation)

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off
resume = False  # continue an interrupted run from its resumable state


def imagenet_start(model):
    """Copy ImageNet weights (all but the classifier) into model, if torchvision can get them."""
    try:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError) as e:
        print(f"ImageNet weights unavailable ({str(e).splitlines()[0][:80]}); training from scratch")
        return model
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    model.load_state_dict(weights, strict=False)
    print("starting from ImageNet weights")
    return model


def main():
    cfg = configure(globals())
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    path = ckpt_dir / files.TEACHER_FILE
    work = ckpt_dir / "teacher_resnet18.pt"  # the last finished epoch, while training
    if not path.exists():
        check_resume(cfg, work)
    course_scale(cfg, ckpt_dir)
    data = common.data_for(cfg, splits=("training", "validation"))
    device = pick_device(cfg.device)
    score = common.Scorer(data, cfg, device)

    if path.exists():
        teacher, norm = common.load_teacher(ckpt_dir, data.num_classes, cfg.teacher_norm)
        val = score(teacher, {"norm": norm})
        print(f"{path} found: val acc {val} ({describe_preprocess({'norm': norm}, cfg)}); not retraining")
        outputs, chosen = [], {}
    else:
        common.seed_everything(cfg.seed)
        teacher = common.make_teacher(data.num_classes)
        if cfg.pretrained:
            teacher = imagenet_start(teacher)
        print(f"training the ResNet18 teacher for {cfg.epochs} epochs (norm={cfg.teacher_norm})")
        best = common.fit(teacher, data, common.cross_entropy(cfg.label_smoothing),
                          epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                          augment=common.augment_of(cfg),
                          norm=cfg.teacher_norm, device=device, out=Resumable(work, cfg), desc="teacher")
        teacher = common.load_model(files.new_path(work))[0]
        val = score(teacher, {"norm": cfg.teacher_norm})
        outputs = files.save_teacher(ckpt_dir, common.cpu_state_dict(teacher), cfg.teacher_norm,
                                     {"img_size": cfg.img_size, "val_acc": val.acc, **data.selection})
        chosen = {"select_acc": round(best["select_acc"], 4)}
        print(f"teacher: val acc {val} (the last of {best['epoch']} epochs)")
    size_of = files.new_path(path) if outputs else path
    record = common.model_record("0 teacher", "teacher_resnet18", teacher, size_of, val, cfg.img_size,
                                 sha1=files.teacher_sha1(size_of), **chosen)  # a new teacher drops the rows made with the old one
    files.say_written(files.publish(ckpt_dir, outputs, [record],
                                    finished=[files.new_path(work), Resumable(work, cfg).state]))


if __name__ == "__main__":
    run(main)
