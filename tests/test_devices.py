"""The GPUs users train on, held on the CPU: no float64 on a device (Apple's MPS has none),
nothing in a training step that waits for the device, no tensor copied from the host inside a
step (a CUDA GPU would wait for each), and a jittered view the same in any batch without float64."""
import math
import sys
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import REPO, load_script
import common
from support import qfile
from support.resume import Resumable

quant = load_script("04_quantize.py")
CPU = torch.device("cpu")


def tensors_in(*trees):
    return [t for t in tree_leaves(trees) if isinstance(t, torch.Tensor)]


class Watch(TorchDispatchMode):
    """Records every aten op that `bad(func, inputs, outputs)` names."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.seen = bad, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.bad(func, tensors_in(args, kwargs), tensors_in(out)):
            self.seen.append(str(func))
        return out


FILE_ARITHMETIC = {qfile.encode.__code__, qfile.decode.__code__}  # writes and reads files: on the CPU by construction


def in_file_arithmetic():
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code in FILE_ARITHMETIC:
            return True
        frame = frame.f_back
    return False


def float64_outside_the_files(func, inputs, outputs):
    return any(t.dtype == torch.float64 for t in inputs + outputs) and not in_file_arithmetic()


def a_copy_from_the_host(func, inputs, outputs):
    """On the stand-in device (meta): an op that takes a host tensor and gives a device one, or
    builds a tensor from Python numbers (each a copy a GPU waits for), or float64 there."""
    on_device = [t for t in outputs if t.device.type == "meta"]
    return bool(on_device) and (any(t.device.type == "cpu" for t in inputs)
                                or func is torch.ops.aten.lift_fresh.default
                                or any(t.dtype == torch.float64 for t in on_device))


AUGMENT = common.Augment(16, rotate=10.0, jitter=0.2, seed=1, mix="cutmix")


def tiny_fit(data, model, loss, folder, epochs=1):
    folder.mkdir()
    return common.fit(model, data, loss, epochs=epochs, lr=1e-3, batch_size=16, augment=AUGMENT, sparsity=1e-4,
                      norm="imagenet", device=CPU, out=Resumable(folder / "m.pt", {"resume": False}))


@pytest.fixture(scope="module")
def data(sample_root):
    return common.load_data(sample_root, 18, select_fraction=0.1)


def distillation():
    torch.manual_seed(1)
    teacher = common.StudentNet(num_classes=11)
    return common.distill_loss(common.InlineTeacher(teacher, "imagenet"), 4.0, 0.5)


# --- no float64 on a device -----------------------------------------------------------------------

def test_training_qat_and_evaluation_use_no_float64_outside_the_file_format(data, tmp_path):
    """Two epochs of distillation on jittered, rotated CutMix views (augmentation, steps,
    selection scores, checkpoints), then two of QAT through 3-bit codes (its evaluation decodes
    the file's arithmetic on the CPU, the one place float64 is allowed)."""
    torch.manual_seed(0)
    model = common.StudentNet(num_classes=11)
    with Watch(float64_outside_the_files) as watch:
        tiny_fit(data, model, distillation(), tmp_path / "kd", epochs=2)
        fq = quant.FakeQuant(model, "mix3")
        tiny_fit(data, fq, common.cross_entropy(), tmp_path / "qat", epochs=2)
        common.evaluate(fq, data.val.images, data.val.labels, 16, 16, "imagenet")
    assert not watch.seen, sorted(set(watch.seen))


def test_a_jittered_view_is_the_same_in_any_batch_without_float64():
    """The jitter's per-image mean is exact (integers float32 holds), so a 224 px view comes out
    bit for bit the same alone and among others, however the threads split the sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last)
        factors = 1 + (torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.3
        with Watch(float64_outside_the_files) as watch:
            together = common.jitter_batch(x, factors)
            alone = [common.jitter_batch(x[i:i + 1], factors[:, i:i + 1])[0] for i in range(5)]
        assert not watch.seen
        assert all(torch.equal(a, t) for a, t in zip(alone, together))
        k = math.floor(24 - math.log2(3 * 224 * 224))
        exact = x.double().mean(dim=(1, 2, 3), keepdim=True)
        assert (common.exact_mean(x).double() - exact).abs().max() <= 2.0 ** -(k + 1)
    finally:
        torch.set_num_threads(threads)


# --- nothing in a step waits for the device -----------------------------------------------------------

SYNCS = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"]


@contextmanager
def host_reads_counted(monkeypatch):
    """Counts the reads of a tensor's value to the host (on a GPU, each waits for the device)
    that our code makes while `inside[0]` is set; torch's own (AdamW's step counts live on the
    host) are not ours to count."""
    inside, counted = [False], []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(str(REPO)) and "-packages" not in caller:
                counted.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    yield inside, counted
    monkeypatch.undo()


def flagged(batches, inside):
    """The batches, with inside[0] set from the first one until they are done."""
    inside[0] = True
    yield from batches
    inside[0] = False


@pytest.mark.parametrize("qat", [False, True])
def test_no_training_step_reads_a_value_back_to_the_host(data, monkeypatch, qat):
    torch.manual_seed(0)
    model = common.StudentNet(num_classes=11)
    model = common.prepare(quant.FakeQuant(model, "mix3") if qat else model, CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    x, y = common.to_device_images(data.train, CPU)
    batches = common.train_batches(x, y, 16, AUGMENT, 0, 0)
    with host_reads_counted(monkeypatch) as (inside, counted):
        result = common.train_epoch(model, flagged(batches, inside), 5, opt, sched, distillation(), 1e-4,
                                    "imagenet", 0, 1e-3)
    assert not counted, counted
    assert len(data.train.labels) // 16 >= 3 and all(math.isfinite(v) for v in result)


def test_a_non_finite_loss_still_stops_the_epoch(data):
    torch.manual_seed(0)
    model = common.prepare(common.StudentNet(num_classes=11), CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    x, y = common.to_device_images(data.train, CPU)
    ce = common.cross_entropy()
    calls = []

    def nan_from_the_second_step(logits, batch):
        calls.append(1)
        return ce(logits, batch) * (math.nan if len(calls) >= 2 else 1.0)
    with pytest.raises(common.UserError, match="non-finite in epoch 1, step 2;"):
        common.train_epoch(model, common.train_batches(x, y, 16, AUGMENT, 0, 0), 5, opt, sched,
                           nan_from_the_second_step, 0.0, "imagenet", 0, 1e-3)


# --- nothing copied from the host inside a step ----------------------------------------------------

@pytest.mark.parametrize("qat", [False, True])
def test_a_training_step_on_a_device_copies_nothing_from_the_host(data, qat):
    """A stand-in device (meta: shapes, no values) fails or is flagged wherever a step would
    copy a host tensor to the device: a batch's index grids, rotation matrix, jitter factors,
    normalisation constants, fake quantization's ranges."""
    torch.manual_seed(0)
    model = common.StudentNet(num_classes=11)
    model = common.prepare(quant.FakeQuant(model, "mix3") if qat else model, torch.device("meta")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    x, y = (t.to("meta") for t in (data.train.images, data.train.labels))
    batches = common.train_batches(x, y, 16, AUGMENT, 0, 0)  # the view's draws go to the device here, once
    teacher = torch.zeros(len(y), 11, device="meta")

    def kd(logits, batch):
        return common.kd_loss(logits, teacher[batch.idx], batch.y, 4.0, 0.5, batch.mix)
    with Watch(a_copy_from_the_host) as watch:
        for _ in range(2):
            batch = next(batches)
            common.train_step(model, batch, opt, sched, kd, 1e-4, "imagenet")
    assert batch.x.device.type == "meta" and batch.idx.device.type == "meta"
    assert not watch.seen, sorted(set(watch.seen))
