"""Speed of the data path, as ratios measured in one run (machines here are noisy).

For each image size it times student training steps fed four ways: our path (uint8
tensors, whole-batch crop/flip/rotation/jitter; also with mixup or CutMix, which build each
partner's view too), ready-made tensors (forward/backward/step
alone: the floor), and the usual way (a Dataset that opens each file with PIL and applies
torchvision transforms per image, in a DataLoader with num_workers 0 and 2). It also times
decoding a split against reading it back from the cache, and a distillation step against a
plain one two ways: asking the teacher about every batch, and reading its answers from a
teacher bank (the logits of the view, looked up by image index; the bank here holds made-up
logits, as building it is the same teacher forward the inline row times).

    python benchmark.py                      # food101-10 at 128 and 256 px
"""
import dataclasses
import itertools
import tempfile
import time

import common  # first: Ctrl-C during the slow imports is then a clean exit
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from support import images as decoding
from support import reports
from support.bank import TeacherBank
from support.running import run
from support.settings import configure, pick_device

# --- settings (each can be overridden as --name=value) -------------------------------------
data_dir = "../shared/data/food101-10"  # a Food-11-layout data set
sizes = "128,256"  # crop sizes to compare
steps = 6  # timed training steps per method, size and round
rounds = 3  # rounds over all methods; each method's median round is reported
batch_size = 64  # images per step
rotate = 10.0  # rotation (degrees), the same for every method
jitter = 0.1  # colour jitter, the same for every method
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
seed = 0  # random seed


class PILFolder(torch.utils.data.Dataset):
    """The usual way: open, decode and transform one file per __getitem__."""

    def __init__(self, root, transform):
        self.files = decoding.list_images(root, "training")
        self.labels = [decoding.parse_label(p) for p in self.files]
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def usual_transform(size, cfg):
    return transforms.Compose([
        transforms.Resize(round(size * 8 / 7)), transforms.RandomCrop(size),
        transforms.RandomHorizontalFlip(), transforms.RandomRotation(cfg.rotate),
        transforms.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter), transforms.ToTensor(),
        transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])


def timed_steps(model, opt, batches, n, device, loss_fn=None):
    """Seconds for n training steps (after one warm-up step) over an iterator of (x, y)."""
    model.train()
    t0 = None
    for i, batch in enumerate(batches):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        batch = batch._replace(x=batch.x.to(device, non_blocking=True), y=batch.y.to(device, non_blocking=True))
        with common.autocast(device):
            logits = model(batch.x.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(logits, batch) if loss_fn else F.cross_entropy(logits.float(), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == n:
            break
    sync(device)
    return time.perf_counter() - t0


def loader(dataset, cfg, workers):
    batches = torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=True, num_workers=workers,
                                          drop_last=True)
    return (common.Batch(x, y, None, 0) for x, y in batches)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_batches(images, labels, aug, cfg):
    for epoch in itertools.count():
        for batch in common.train_batches(images, labels, cfg.batch_size, aug, epoch, epoch % VIEWS):
            yield batch._replace(x=common.normalize(batch.x, "imagenet"))


VIEWS = 4  # views in the benchmark's teacher bank


def made_up_bank(split, n_classes, aug):
    """A TeacherBank serving random logits for VIEWS views: the serving path, without the build."""
    bank = TeacherBank(tempfile.gettempdir(), {"benchmark": aug.crop}, len(split.labels), n_classes)
    rng = np.random.default_rng(0)
    bank.views = {v: rng.standard_normal((len(split.labels), n_classes)).astype(np.float16) for v in range(VIEWS)}
    return bank


def main():
    cfg = configure(globals())
    device = pick_device(cfg.device)
    sizes = [int(s) for s in cfg.sizes.split(",")]
    print(f"benchmark on {device}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, "
          f"median of {cfg.rounds} interleaved rounds of {cfg.steps} steps per method")

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        decoding.load_split(cfg.data_dir, "training", round(max(sizes) * 8 / 7), cache_dir=cache)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoding.load_split(cfg.data_dir, "training", round(max(sizes) * 8 / 7), cache_dir=cache)
        cached_s = time.perf_counter() - t0
    print(f"\ntraining split: decode {decode_s:.2f}s, from cache {cached_s:.2f}s "
          f"(cache read = {cached_s / decode_s:.3f}x decode)")

    rows = []
    for size in sizes:
        split = decoding.load_split(cfg.data_dir, "training", round(size * 8 / 7))
        n_classes = int(split.labels.max()) + 1
        images, labels = common.to_device_images(split, device)
        torch.manual_seed(cfg.seed)
        model = common.prepare(common.StudentNet(num_classes=n_classes), device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        aug = common.Augment(size, cfg.rotate, cfg.jitter, cfg.seed)
        batch0 = next(our_batches(images, labels, aug, cfg))
        dataset = PILFolder(cfg.data_dir, usual_transform(size, cfg))
        teacher = common.InlineTeacher(common.prepare(common.make_teacher(n_classes), device), "none")  # x is normalised already
        inline_kd = common.distill_loss(teacher, 20.0, 0.5)
        bank_kd = common.distill_loss(made_up_bank(split, n_classes, aug), 20.0, 0.5)
        methods = {  # name -> (a fresh batch iterator, loss)
            "ready tensors": (lambda: itertools.repeat(batch0), None),
            "ours": (lambda: our_batches(images, labels, aug, cfg), None),
            "ours + mixup": (lambda: our_batches(images, labels, dataclasses.replace(aug, mix="mixup"), cfg), None),
            "ours + cutmix": (lambda: our_batches(images, labels, dataclasses.replace(aug, mix="cutmix"), cfg), None),
            "PIL+DataLoader w=0": (lambda: loader(dataset, cfg, 0), None),
            "PIL+DataLoader w=2": (lambda: loader(dataset, cfg, 2), None),
            "ours + teacher (KD)": (lambda: our_batches(images, labels, aug, cfg), inline_kd),
            "ours + teacher bank (KD)": (lambda: our_batches(images, labels, aug, cfg), bank_kd),
        }
        times = {name: [] for name in methods}
        for _ in range(cfg.rounds):  # interleaved, so a slow spell of the machine hits every method
            for name, (batches, loss_fn) in methods.items():
                times[name].append(timed_steps(model, opt, batches(), cfg.steps, device, loss_fn))
        times = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        imgs = cfg.steps * cfg.batch_size
        for method, seconds in times.items():
            rows.append({"size": size, "method": method, "img/s": round(imgs / seconds, 1),
                         "time vs ready tensors": round(seconds / times["ready tensors"], 3),
                         "ours is x faster": round(seconds / times["ours"], 2)})
        overhead = 1 - times["ready tensors"] / times["ours"]
        print(f"{size} px: ours spends {100 * overhead:.1f}% of its step time outside forward/backward/step; "
              f"a distillation step costs {times['ours + teacher (KD)'] / times['ours']:.2f}x a plain one "
              f"with the teacher asked, {times['ours + teacher bank (KD)'] / times['ours']:.2f}x with the bank")
    print()
    print(reports.format_table(rows, list(rows[0])))


if __name__ == "__main__":
    run(main)
