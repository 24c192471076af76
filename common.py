"""What the four stages share: the food data set and its batches, StudentNet, the distillation
loss, the training and evaluation loops, and the score of a model.

The machinery behind them (settings, files, image decoding, the bank's storage, statistics,
reports) lives in support/, which knows nothing of the model.
"""
from support.running import check_torch_pair, quiet_start

quiet_start()  # Ctrl-C while the heavy modules below load is a clean exit
check_torch_pair()

import dataclasses
import hashlib
import importlib.metadata
import inspect
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from support import files, qfile
from support.bank import TeacherBank
from support.images import (NATIVE, Split, canvas_origin, class_names, load_split, make_sample, names_key,
                            native_crop_ranges, storage, training_key)
from support.reports import score_fields
from support.resume import restore, weights_key
from support.settings import check_selection, resize_of
from support.running import Interrupted, UserError, interrupts_as_keyboard_interrupt
from support.stats import Score
from support.views import (LIBRARIES, Augment, constant, crop_flip, draws_on, exact_mean, jitter_batch, mix_batch,
                           rotate_batch, seed_of, seeded, to_float)

interrupts_as_keyboard_interrupt()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STUDENT_NORM = "imagenet"  # how our students' inputs are normalised (recorded in their checkpoints)


# ============================================================================================
# The food data set: training (minus a selection split that chooses), validation, testing
# ============================================================================================

@dataclasses.dataclass
class Data:
    train: Split      # training images minus the selection split
    val: Split        # reports every accuracy; chooses nothing (unless select_fraction=0)
    test: Split       # None when the root has no testing/
    num_classes: int
    class_names: list
    root: str
    select: Split = None   # chooses every epoch, round and file; `val` when select_fraction=0
    selection: dict = None  # {"select_fraction", "select_key"}: recorded in each checkpoint
    files_key: str = ""    # the training file names: what a resumable state was trained on
    resize: int = 0        # the stored shorter side, or NATIVE: recorded in each checkpoint

    @property
    def chosen_on(self):
        return "selection" if self.selection["select_fraction"] else "validation (optimistic)"


def load_data(root, resize, cache_dir=None, splits=("training", "validation", "testing"),
              select_fraction=0.0, native_crop=0):
    """The splits, each stored at `resize` (and at native scale with native_crop, see load_split)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found (it must hold training/ and validation/)")
    names = class_names(root)

    def load(split, labeled=True):
        return load_split(root, split, resize, labeled, cache_dir, native_crop)
    train = load("training") if "training" in splits else None
    val = load("validation")
    test = None
    if "testing" in splits and (root / "testing").is_dir():
        test = load("testing", labeled=False)
    data = Data(train, val, test, len(names), names, str(root), files_key=training_key(root),
                resize=NATIVE if native_crop else resize)
    return hold_out_selection(data, select_fraction)


def selection_indices(names, labels, fraction):
    """The selection split: in each class, the round(fraction * n) files whose names hash
    lowest (at least 1, and at least 1 left to train on). Deterministic from the file list,
    and adding files to one class moves no other file in or out."""
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for members in by_class.values():
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        members.sort(key=lambda i: hashlib.sha1(names[i].encode()).digest())
        chosen += members[:k]
    return sorted(chosen)


def hold_out_selection(data, fraction):
    """Split data.train into training and selection; with fraction 0, validation selects."""
    data.selection = {"select_fraction": fraction, "select_key": ""}
    data.select = data.val
    if not fraction or data.train is None:
        return data
    idx = selection_indices(data.train.names, data.train.labels.tolist(), fraction)
    if not idx:
        raise UserError(f"--select_fraction={fraction}: no class has 2 training images to "
                        "spare one for the selection split; use --select_fraction=0")
    rest = sorted(set(range(len(data.train.names))) - set(idx))
    data.select, data.train = data.train.subset(idx), data.train.subset(rest)
    data.selection["select_key"] = names_key(data.select.names)
    return data


def data_for(cfg, splits=("training", "validation", "testing"), recorded=None):
    """The data a script's settings point at, announced in one line (after the line that says
    where the settings came from). `recorded`: the selection a checkpoint was chosen with."""
    if cfg.notice:
        print(cfg.notice)
        try:
            make_sample(cfg.data_dir)
        except OSError as e:
            raise UserError(f"{cfg.data_dir}: cannot write the generated sample here ({e.strerror}); "
                            "give --data_dir=PATH") from None
    if cfg.provenance():
        print(cfg.provenance())
    stored, native_crop = storage(resize_of(cfg), cfg.img_size)
    data = load_data(cfg.data_dir, stored, cfg.get("cache_dir"), splits, cfg.get("select_fraction", 0.0),
                     native_crop)
    sizes = [f"{n} {len(s.labels)}" for n, s in
             (("training", data.train), ("validation", data.val), ("testing", data.test)) if s is not None]
    if data.select is not data.val:
        sizes.insert(1, f"selection {len(data.select.labels)} (held out of training to choose models)")
    how = (f"native scale, a {stored} px canvas each" if native_crop else f"{stored} px stored")
    print(f"data: {data.root}: {data.num_classes} classes; {', '.join(sizes)} images "
          f"({how}, {cfg.img_size} px crops)")
    if recorded:
        check_selection(data.selection, recorded, recorded["source"], cfg.get("other_selection", False))
    return data


# ============================================================================================
# Batches: whole-batch augmentation on uint8 tensors (support/views.py), normalisation per model
# ============================================================================================

def to_device_images(split, device):
    """The split's uint8 images on the device, once per run (NHWC: channels_last for free)."""
    return split.images.to(device), split.labels.to(device)


def augment_of(cfg):
    """A stage's training augmentation, from its settings (mixing only where a stage has it;
    mix_alpha only where it mixes, so that it keys no bank or state otherwise)."""
    mix = cfg.get("mix", "none")
    return Augment(cfg.img_size, cfg.rotate, cfg.jitter, cfg.seed, mix, cfg.mix_alpha if mix != "none" else 1.0)


def normalize(x, norm):
    if norm == "imagenet":
        mean = constant(IMAGENET_MEAN, x.device).view(1, 3, 1, 1)
        std = constant(IMAGENET_STD, x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    return x


class Batch(NamedTuple):
    x: torch.Tensor    # augmented floats in [0, 1], N x 3 x H x W
    y: torch.Tensor    # labels
    idx: torch.Tensor  # the images' indices in the training split (on the images' device)
    view: int          # which view of them x is
    mix: tuple = None  # mixed views: (the partners' labels, each image's own share); None: unmixed

    def main_labels(self):
        """The label of the larger share of each view (for the training accuracy)."""
        return self.y if self.mix is None else torch.where(self.mix[1] >= 0.5, self.y, self.mix[0])


def train_batches(images, labels, batch_size, aug, epoch, view, ranges=None):
    """Epoch `epoch`'s shuffled batches of view `view`; the last partial batch is dropped.
    The order is drawn from (seed, epoch), the view from (seed, view); `ranges`: a native-scale
    split's crop ranges (Split.crop_ranges). Both go to the images' device here, once, so that
    making a batch copies nothing from the host."""
    n = len(labels)
    draws = draws_on(aug.draws(view, n, images.shape[1], ranges), images.device)
    order = torch.randperm(n, generator=seeded(aug.seed, "order", epoch)).to(images.device)
    batch_size = min(batch_size, n)

    def batches():
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            y, mix = aug.labels_of(labels, idx, draws)
            yield Batch(aug.apply(images, idx, draws), y, idx, view, mix)
    return batches()


def eval_batches(images, labels, batch_size, crop):
    size = images.shape[1]
    top = (size - crop) // 2
    for i in range(0, len(labels), batch_size):
        yield to_float(images[i:i + batch_size, top:top + crop, top:top + crop]), labels[i:i + batch_size]


# ============================================================================================
# The models: the course's StudentNet, the ResNet18 teacher, and their files
# ============================================================================================

MULTIPLIERS = [1, 2, 4, 8, 16, 16, 16, 16]


def student_widths(base=16, width_mult=1.0):
    widths = [base * m for m in MULTIPLIERS]
    for i in range(3, 7):
        widths[i] = int(widths[i] * width_mult)
    return widths


class StudentNet(nn.Module):
    """The course's MobileNet-v1 student: full conv, then 7 depthwise-separable blocks.

    Parameter names match the course's `student_custom_small.bin` (256,779 parameters at
    base 16, width_mult 1, 11 classes). `widths` (one output width per block) rebuilds a
    pruned shape.
    """

    def __init__(self, base=16, width_mult=1.0, num_classes=11, widths=None):
        super().__init__()
        w = list(widths) if widths is not None else student_widths(base, width_mult)
        if len(w) != 8 or min(w) < 1:
            raise ValueError(f"widths must be 8 positive channel counts, got {w}")
        self.widths = w
        blocks = [nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1), nn.BatchNorm2d(w[0]), nn.ReLU6(),
                                nn.MaxPool2d(2, 2, 0))]
        for i in range(1, 8):
            layers = [nn.Conv2d(w[i - 1], w[i - 1], 3, 1, 1, groups=w[i - 1]),
                      nn.BatchNorm2d(w[i - 1]), nn.ReLU6(), nn.Conv2d(w[i - 1], w[i], 1)]
            if i <= 3:
                layers.append(nn.MaxPool2d(2, 2, 0))
            blocks.append(nn.Sequential(*layers))
        blocks.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.cnn = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(w[7], num_classes))

    def forward(self, x):
        return self.fc(self.cnn(x).flatten(1))


def make_teacher(num_classes):
    import torchvision  # here: importing it takes a second and a half, and only the teacher needs it
    return torchvision.models.resnet18(num_classes=num_classes)


def arch_of(model):
    if isinstance(model, StudentNet):
        return {"kind": "student", "widths": list(model.widths),
                "num_classes": model.fc[0].out_features}
    return {"kind": "resnet18", "num_classes": model.fc.out_features}


def build_model(arch):
    if arch["kind"] == "student":
        return StudentNet(widths=arch["widths"], num_classes=arch["num_classes"])
    if arch["kind"] == "resnet18":
        return make_teacher(arch["num_classes"])
    raise ValueError(f"unknown model kind {arch['kind']!r}")


def arch_from_state_dict(sd):
    """Recognise a plain state_dict (the course's files) by its keys and shapes."""
    try:
        if "cnn.0.0.weight" in sd:
            widths = [sd["cnn.0.0.weight"].shape[0]] + [sd[f"cnn.{i}.3.weight"].shape[0] for i in range(1, 8)]
            return {"kind": "student", "widths": widths, "num_classes": sd["fc.0.weight"].shape[0]}
        if "conv1.weight" in sd and "layer4.1.bn2.weight" in sd:
            return {"kind": "resnet18", "num_classes": sd["fc.weight"].shape[0]}
    except (KeyError, AttributeError):
        pass
    return None


def describe(arch):
    if arch["kind"] == "student":
        return f"a StudentNet (widths {arch['widths']}) with {arch['num_classes']} classes"
    return f"a ResNet18 with {arch['num_classes']} classes"


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, img_size):
    from torch.utils.flop_counter import FlopCounterMode
    model = model.eval()
    x = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def prepare(model, device):
    return model.to(device=device, memory_format=torch.channels_last)


def cpu_state_dict(model):
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def checkpoint(model, preprocess, metrics=None):
    """What our .pt files hold: the model's shape, its preprocessing, its weights, its metrics."""
    return {"arch": arch_of(model), "preprocess": dict(preprocess), "state_dict": cpu_state_dict(model),
            "metrics": dict(metrics or {})}


def save_checkpoint(path, model, preprocess, metrics=None):
    files.atomic_torch_save(checkpoint(model, preprocess, metrics), path)


def load_model(path, expect=None, num_classes=None, plain_norm="none", made_by=None):
    """(model, preprocess, metrics) from one of our checkpoints (.pt), a quantized file (.npz)
    or a plain state_dict (the course's .bin files, which carry no preprocessing: `plain_norm`
    says how they were trained)."""
    if Path(str(path).removesuffix(".new")).suffix == ".npz":
        model, meta = qfile.read_quantized(path, build_model)
        preprocess = {"norm": STUDENT_NORM, **meta.get("preprocess", {})}
        size = preprocess.get("img_size", 32)
        if type(size) is not int or not 16 <= size <= 4096:
            raise UserError(f"{path}: not a quantized model file (its preprocessing has img_size={size!r})")
        if not logits_finite(model, 32):  # any size: both models pool adaptively
            raise UserError(f"{path}: not a quantized model file (the model it decodes to gives logits that "
                            "are not finite)")
        return model, preprocess, {}
    obj = files.torch_load(path, made_by)
    if isinstance(obj, dict) and "state_dict" in obj and "arch" in obj:
        sd, arch = obj["state_dict"], obj["arch"]
        preprocess, metrics = {"norm": STUDENT_NORM, **obj.get("preprocess", {})}, obj.get("metrics", {})
    elif isinstance(obj, dict):  # no record: the course's convention (no normalisation) means its scale too
        sd, arch = obj, arch_from_state_dict(obj)
        preprocess, metrics = {"norm": plain_norm, **({"resize": NATIVE} if plain_norm == "none" else {})}, {}
    else:
        sd = arch = None
    if arch is None:
        raise UserError(f"{path}: not a StudentNet or ResNet18 checkpoint")
    try:
        model = build_model(arch)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    wanted = {"kind": expect, "num_classes": num_classes}
    if any(v is not None and arch.get(k) != v for k, v in wanted.items()):
        want = describe({"kind": expect or arch["kind"], "num_classes": num_classes or arch["num_classes"],
                         "widths": arch.get("widths")})
        raise UserError(f"{path}: holds {describe(arch)}, but {want} is needed here")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit {describe(arch)} "
                        f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, preprocess, metrics


@torch.no_grad()
def logits_finite(model, img_size):
    """Whether the model's logits on one blank image are finite numbers: a file whose ranges are
    finite but huge decodes to weights that overflow, or to a negative BatchNorm variance."""
    training = model.training
    finite = bool(model.eval()(torch.zeros(1, 3, img_size, img_size)).isfinite().all())
    model.train(training)
    return finite


def load_teacher(ckpt_dir, num_classes, teacher_norm):
    """(teacher, norm). The norm comes from the note 00_teacher.py writes beside the file,
    else (the course's file, the shared one) from the teacher_norm setting."""
    path = Path(ckpt_dir) / files.TEACHER_FILE
    model = load_model(path, expect="resnet18", num_classes=num_classes, made_by="00_teacher.py")[0]
    norm = files.teacher_norm_of(ckpt_dir, teacher_norm)
    if norm != teacher_norm:
        print(f"note: {path.name} was trained with norm={norm}, as its .json note records; "
              f"using that, not --teacher_norm={teacher_norm}")
    return model, norm


# ============================================================================================
# Knowledge distillation: the loss, and the teacher's answers (asked inline or from the bank)
# ============================================================================================

def kd_loss(student_logits, teacher_logits, labels, T, alpha, mix=None):
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
    + (1 - alpha) * CE(s, y), the KL taken on the student's log_softmax(s/T); `mix` as label_loss's."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
    return alpha * T * T * kl + (1 - alpha) * label_loss(s, labels, mix)


def label_loss(logits, labels, mix=None, label_smoothing=0.0):
    """Cross-entropy against the labels; on mixed views (mix = (the partners' labels, each
    view's own share)) against both labels, weighted by their shares of the pixels."""
    if mix is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    def ce(y):
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
    partner_labels, share = mix
    return (share * ce(labels) + (1 - share) * ce(partner_labels)).mean()


def distill_loss(teacher, T, alpha):
    """A loss(logits, batch) for fit(): kd_loss against teacher(batch), the teacher's logits for
    the batch's view (an InlineTeacher or a TeacherBank)."""
    def loss(logits, batch):
        return kd_loss(logits, teacher(batch), batch.y, T, alpha, batch.mix)
    loss.describe = f"distillation T={T} alpha={alpha}"
    return loss


def cross_entropy(label_smoothing=0.0):
    """A loss(logits, batch) for fit(): the labels alone (mixed as the views were)."""
    def loss(logits, batch):
        return label_loss(logits, batch.y, batch.mix, label_smoothing)
    loss.describe = "cross-entropy" + (f" smoothing={label_smoothing}" if label_smoothing else "")
    return loss


def bn_l1(model):
    """Network slimming's sparsity term: the L1 norm of every BatchNorm gamma."""
    return sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class InlineTeacher:
    """The frozen teacher asked about every batch as it comes (--teacher_bank=False)."""

    def __init__(self, model, norm):
        self.model, self.norm, self.images = model.eval().requires_grad_(False), norm, 0

    def __call__(self, batch):
        with torch.inference_mode(), autocast(batch.x.device):
            t = self.model(normalize(batch.x, self.norm))
        self.images += len(t)
        return t.clone()  # a normal tensor autograd may keep


def view_code_key():
    """A key of the code that makes a view's pixels and the teacher's answer to them (the draws,
    the native-scale crop ranges, the crop, flip, rotation, jitter, the teacher's normalisation,
    and torchvision's version, whose code the teacher is): a bank built by other code is never
    served."""
    parts = (seed_of, seeded, Augment, native_crop_ranges, canvas_origin, crop_flip, to_float, mix_batch,
             rotate_batch, jitter_batch, exact_mean, normalize)
    code = "".join(inspect.getsource(p) for p in parts) + f"torchvision {importlib.metadata.version('torchvision')}"
    return hashlib.sha1(code.encode()).hexdigest()[:16]


def teacher_for(cfg, ckpt_dir, data, aug, device, views, loaded=None):
    """What the distillation loss asks: the teacher bank holding `views` (the `aug`mentation's)
    of the training images (the teacher asked once per view, where missing), or with
    --teacher_bank=False the teacher itself on every batch. `loaded`: the (teacher, norm) the
    stage has loaded already, if any."""
    def get_teacher():
        return loaded or load_teacher(ckpt_dir, data.num_classes, cfg.teacher_norm)
    if not cfg.teacher_bank:
        model, norm = get_teacher()
        print(f"teacher: asked about every batch (--teacher_bank=False), norm={norm}")
        return InlineTeacher(prepare(model, device), norm)
    norm, train = files.teacher_norm_of(ckpt_dir, cfg.teacher_norm), data.train
    key = {"view_code": view_code_key(), "teacher_sha1": files.file_sha1(Path(ckpt_dir) / files.TEACHER_FILE),
           "norm": norm, "precision": f"{device.type}, {'bfloat16' if device.type == 'cuda' else 'float32'}",
           "libraries": LIBRARIES, "images": train.key, "names": names_key(train.names),
           "stored": int(train.images.shape[1]), **dataclasses.asdict(aug)}

    def asker():
        """Loads the teacher (only when some view is missing); ask_view(v)(idx) -> its logits."""
        model = prepare(get_teacher()[0], device).eval()
        images, _ = to_device_images(train, device)
        ranges = train.crop_ranges(aug.crop)  # once: at native scale a loop over every image

        def ask_view(v):
            draws = draws_on(aug.draws(v, len(train.labels), images.shape[1], ranges), device)

            def ask(idx):
                with torch.inference_mode(), autocast(device):
                    return model(normalize(aug.apply(images, idx, draws), norm)).half().cpu()
            return ask
        return ask_view
    return TeacherBank(ckpt_dir, key, len(train.labels), data.num_classes).build(views, asker, device.type == "cuda")


# ============================================================================================
# Training and evaluation loops
# ============================================================================================

def fit(model, data, loss, *, epochs, lr, batch_size, augment, schedule="onecycle", weight_decay=0.0,
        views=None, sparsity=0.0, norm, device, out, desc="train", notes=None):
    """Train with AdamW, the learning rate one-cycle (peak `lr`) or constant, minimising
    loss(logits, batch) (+ sparsity * the L1 of the BatchNorm gammas) on `augment`ed views of
    data.train: epoch e trains on view e mod `views` (default: a new view every epoch).

    Keeps the last epoch in out.best (`<path>.new`), for the stage to publish() when it has
    finished: a one-cycle schedule ends where it has converged, and a model whose epoch was not
    picked on the selection split keeps an honest score there for the choices of 03 and 04.
    The selection split is scored after every epoch, to watch. After every epoch a resumable
    state goes to out.state, which out.resume continues (a finished state just returns).
    Returns the last epoch's metrics (with `notes`, which the checkpoint records too)."""
    model = prepare(model, device)
    views = views or epochs
    training = {"epochs": epochs, "lr": lr, "schedule": schedule, "weight_decay": weight_decay,
                "batch_size": batch_size, "augment": list(dataclasses.astuple(augment)),
                "loss": getattr(loss, "describe", "custom"), "views": views, "sparsity": sparsity, "norm": norm,
                "widths": arch_of(model).get("widths"), "data": data.files_key, "start": weights_key(model)}
    preprocess = {"norm": norm, "img_size": augment.crop, "resize": data.resize, **data.selection}
    train_x, train_y = to_device_images(data.train, device)
    sel_x, sel_y = to_device_images(data.select, device)
    sel_name = "select" if data.select is not data.val else "val"
    steps = len(train_y) // min(batch_size, len(train_y))
    ranges = data.train.crop_ranges(augment.crop)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if schedule == "constant":  # the course's
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    start, kept = 0, {}
    state = out.load(training)
    if state is not None:
        start, kept = restore(state, out.state, model, opt, sched)
        print(f"resuming {desc} from {out.state} after epoch {start}" + (" (it had finished)" if start == epochs else ""))
    for epoch in range(start, epochs):
        try:
            batches = train_batches(train_x, train_y, batch_size, augment, epoch, epoch % views, ranges)
            train_loss, train_acc, seconds, speed = train_epoch(model, batches, steps, opt, sched, loss, sparsity,
                                                                norm, epoch, lr)
        except KeyboardInterrupt:
            where = (f"{out.state} (after epoch {epoch}); rerun with --resume=True" if epoch
                     else "none yet, the first epoch had not finished")
            raise Interrupted(f"epoch {epoch + 1} of {desc} was abandoned; the previous outputs are as "
                              f"they were; resumable state: {where}") from None
        sel_losses, correct = evaluate(model, sel_x, sel_y, batch_size, augment.crop, norm)
        kept = {**epoch_metrics(float(correct.mean()), float(sel_losses.mean()), epoch + 1, views), **(notes or {})}
        save_checkpoint(out.best, model, preprocess, kept)
        out.save({"model": cpu_state_dict(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "best": kept}, training)
        print(f"{desc} epoch {epoch + 1:3d}/{epochs}  loss {train_loss:.3f} acc {train_acc:.3f}  {sel_name} loss "
              f"{kept['select_loss']:.3f} acc {kept['select_acc']:.3f}  {seconds:5.1f}s {speed:6.0f} img/s", flush=True)
    return kept


def epoch_metrics(select_acc=0.0, select_loss=0.0, epoch=1, views=1):
    """What fit() records of the epoch it keeps (the last) in its checkpoint (01 sizes a file with it)."""
    return {"select_acc": select_acc, "select_loss": select_loss, "epoch": epoch, "views": views}


def train_epoch(model, batches, steps, opt, sched, loss_fn, sparsity, norm, epoch, lr):
    """One pass over the batches (mean loss, accuracy, seconds, img/s). The sums and the first
    non-finite step stay on the device and are read once, at the end of the epoch, which a
    non-finite loss then stops: no step waits for the device."""
    model.train()
    t0 = time.perf_counter()
    seen, sums, first_bad = 0, 0, -1
    for step, batch in enumerate(tqdm(batches, total=steps, leave=False, desc=f"epoch {epoch + 1}", disable=None)):
        loss, correct = train_step(model, batch, opt, sched, loss_fn, sparsity, norm)
        seen += len(batch.y)
        sums = sums + torch.stack([loss * len(batch.y), correct])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
    total, correct = sums.tolist() if seen else (0.0, 0.0)
    first_bad = int(first_bad)
    if first_bad >= 0:
        raise UserError(f"the loss became non-finite in epoch {epoch + 1}, step {first_bad + 1}; "
                        f"the best checkpoint is untouched; try a lower --lr (now {lr})")
    seconds = time.perf_counter() - t0
    return total / seen, correct / seen, seconds, seen / seconds


def train_step(model, batch, opt, sched, loss_fn, sparsity, norm):
    """Forward, loss, backward, step: (the loss, the number of views classified right), on the device."""
    with autocast(batch.x.device):
        logits = model(normalize(batch.x, norm))
    loss = loss_fn(logits, batch)
    if sparsity:
        loss = loss + sparsity * bn_l1(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach().float(), (logits.argmax(1) == batch.main_labels()).sum().float()


def seed_everything(seed):
    torch.manual_seed(seed)  # weights; batch order and views are drawn from (seed, epoch/view)


@contextmanager
def plain_fp32(device):
    """Evaluation in plain fp32 on every device (no autocast, no TF32), so that two files
    compared differ only by what was done to their weights."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def logits_of(model, images, batch_size, crop, norm):
    """The logits of the centre crops of `images`, in plain fp32, on the CPU."""
    model.eval()
    unlabeled = torch.zeros(len(images), dtype=torch.long)
    with plain_fp32(images.device):
        return torch.cat([model(normalize(x, norm)).float().cpu()
                          for x, _ in eval_batches(images, unlabeled, batch_size, crop)])


def evaluate(model, images, labels, batch_size, crop, norm):
    """(per-image cross-entropy, per-image correctness as a bool array) on centre crops, in fp32."""
    logits, labels = logits_of(model, images, batch_size, crop, norm), labels.cpu()
    return F.cross_entropy(logits, labels, reduction="none").numpy(), (logits.argmax(1) == labels).numpy()


# ============================================================================================
# The score of a model: on validation (reports) or the selection split (chooses)
# ============================================================================================

class Scorer:
    """Scores a model on the validation or the selection images at the preprocessing it
    records (img_size, resize, norm; the script's settings where it records none). Each split
    goes to the device once per stored size."""

    def __init__(self, data, cfg, device):
        self.cfg, self.device, self.data = cfg, device, data
        self.by_storage = {storage(resize_of(cfg), cfg.img_size): data}
        self.on_device = {}

    def images(self, preprocess, split="val"):
        """(uint8 images, labels, names_key) of a split, stored as `preprocess` says, on the device."""
        stored = storage(preprocess.get("resize") or resize_of(self.cfg), preprocess.get("img_size") or self.cfg.img_size)
        if (stored, split) not in self.on_device:
            if stored not in self.by_storage:
                self.by_storage[stored] = load_data(self.cfg.data_dir, stored[0], self.cfg.get("cache_dir"),
                                                    ("training", "validation"),
                                                    self.data.selection["select_fraction"], stored[1])
            images = getattr(self.by_storage[stored], split)
            self.on_device[stored, split] = (*to_device_images(images, self.device), names_key(images.names))
        return self.on_device[stored, split]

    def __call__(self, model, preprocess, split="val"):
        x, y, key = self.images(preprocess, split)
        losses, correct = evaluate(prepare(model, self.device), x, y, self.cfg.batch_size,
                                   preprocess.get("img_size") or self.cfg.img_size, preprocess["norm"])
        return Score(correct, key, losses)

    def both(self, model, preprocess):
        """(validation Score, selection Score)."""
        return self(model, preprocess), self(model, preprocess, "select")


def model_record(stage, name, model, path, val, img_size, **extra):
    """One model's record for the results log: its size, cost and validation Score."""
    return {"stage": stage, "model": name, "params": count_params(model), "bytes": files.file_bytes(path),
            "macs": count_macs(model.cpu().float(), img_size), **score_fields(val), **extra}
