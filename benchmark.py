"""Speed of the data path, as ratios measured in one run (machines here are noisy).

For each image size it times student training steps fed four ways: our path (uint8
tensors, whole-batch crop/flip/rotation/jitter), ready-made tensors (forward/backward/step
alone: the floor), and the usual way (a Dataset that opens each file with PIL and applies
torchvision transforms per image, in a DataLoader with num_workers 0 and 2). It also times
decoding a split against reading it back from the cache, and a distillation step (the
teacher's forward added) against a plain one.

    python benchmark.py                      # food101-10 at 128 and 256 px
"""
import tempfile
import time

import common  # first: Ctrl-C during the slow imports is then a clean exit
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

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
        self.files = common.list_images(root, "training")
        self.labels = [common.parse_label(p) for p in self.files]
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
    for i, (x, y) in enumerate(batches):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with common.autocast(device):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == n:
            break
    sync(device)
    return time.perf_counter() - t0


def loader(dataset, cfg, workers):
    return torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_batches(images, labels, size, cfg, gen):
    while True:
        for x, y in common.train_batches(images, labels, cfg.batch_size, size, gen, cfg.rotate, cfg.jitter):
            yield common.normalize(x, "imagenet"), y


def main():
    cfg = common.configure(globals())
    device = common.pick_device(cfg.device)
    sizes = [int(s) for s in cfg.sizes.split(",")]
    print(f"benchmark on {device}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, "
          f"median of {cfg.rounds} interleaved rounds of {cfg.steps} steps per method")

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        common.load_split(cfg.data_dir, "training", round(max(sizes) * 8 / 7), cache_dir=cache)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        common.load_split(cfg.data_dir, "training", round(max(sizes) * 8 / 7), cache_dir=cache)
        cached_s = time.perf_counter() - t0
    print(f"\ntraining split: decode {decode_s:.2f}s, from cache {cached_s:.2f}s "
          f"(cache read = {cached_s / decode_s:.3f}x decode)")

    rows = []
    for size in sizes:
        split = common.load_split(cfg.data_dir, "training", round(size * 8 / 7))
        n_classes = int(split.labels.max()) + 1
        images, labels = common.to_device_images(split, device)
        torch.manual_seed(cfg.seed)
        model = common.prepare(common.StudentNet(num_classes=n_classes), device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(cfg.seed)
        x0, y0 = next(our_batches(images, labels, size, cfg, gen))
        dataset = PILFolder(cfg.data_dir, usual_transform(size, cfg))
        teacher = common.prepare(common.make_teacher(n_classes), device)
        kd = common.distill_loss(teacher, "none", 20.0, 0.5)  # x arrives normalised already
        methods = {  # name -> (a fresh batch iterator, loss)
            "ready tensors": (lambda: iter(lambda: (x0, y0), None), None),
            "ours": (lambda: our_batches(images, labels, size, cfg, gen), None),
            "PIL+DataLoader w=0": (lambda: iter(loader(dataset, cfg, 0)), None),
            "PIL+DataLoader w=2": (lambda: iter(loader(dataset, cfg, 2)), None),
            "ours + teacher (KD)": (lambda: our_batches(images, labels, size, cfg, gen), kd),
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
        print(f"{size} px: ours spends {100 * overhead:.1f}% of its step time outside "
              f"forward/backward/step; a distillation step costs {times['ours + teacher (KD)'] / times['ours']:.2f}x a plain one")
    print()
    print(common.format_table(rows, list(rows[0])))


if __name__ == "__main__":
    common.run(main)
