import copy
import hashlib
import re
import io
import zipfile

import numpy as np
import pytest
import torch

import common
from support import qfile, reports, running, settings
from conftest import load_script, run_script

quant = load_script("04_quantize.py")


def encode(state_dict, bits, per_channel=False, plan=None):
    """A file's arrays in a layout given by hand, with 04's min-max codes."""
    return qfile.encode(state_dict, bits, per_channel, plan, quantize=quant.minmax_quantize)


def student_state():
    torch.manual_seed(0)
    model = common.StudentNet()
    model.cnn[1][1].running_var.fill_(0.7)          # a constant tensor
    model.cnn[2][1].num_batches_tracked.fill_(1234)  # an integer buffer
    return common.cpu_state_dict(model)


def npz_round_trip(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_within_half_a_step(sd, out, bits_of, per_channel):
    assert list(out) == list(sd)
    for name, x in sd.items():
        y = out[name]
        assert y.dtype == x.dtype and y.shape == x.shape
        if not x.is_floating_point():
            assert torch.equal(x, y)
            continue
        rows = x.reshape(x.shape[0], -1) if per_channel and x.ndim >= 2 else x.reshape(1, -1)
        lo, hi = rows.min(1).values[:, None], rows.max(1).values[:, None]
        slack = (lo.abs() + hi.abs()) * 2 ** -10 if per_channel else 1e-6  # float16 ranges per channel
        err = (y.reshape(rows.shape) - rows).abs()
        assert (err <= (hi - lo) / (2 * (2 ** bits_of(name) - 1)) + slack + 1e-6).all(), name


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_element_is_within_half_a_step(bits, per_channel):
    """Every tensor at one width, as a file of the format may hold it (04's layouts keep 1-D tensors at 8 bits)."""
    sd = student_state()
    out = qfile.decode(npz_round_trip(encode(sd, bits, per_channel)))
    assert_within_half_a_step(sd, out, lambda name: bits, per_channel)


@pytest.mark.parametrize("variant", ["mix4", "mix3", "mix2"])
def test_a_mixed_layout_records_and_keeps_each_tensors_bits(variant):
    sd = student_state()
    bits, per_channel, plan = quant.layout_of(variant, sd)
    assert plan and set(plan) == {f"cnn.{i}.3.weight" for i in range(1, 8)}
    arrays = npz_round_trip(encode(sd, bits, per_channel, plan))
    meta = qfile.json_of(arrays["meta"])
    assert {s["name"]: s["bits"] for s in meta["tensors"] if "bits" in s} == {n: plan.get(n, 8) for n, t in sd.items()
                                                                              if t.is_floating_point()}
    assert_within_half_a_step(sd, qfile.decode(arrays), lambda name: plan.get(name, 8), True)
    uniform = encode(sd, 8, True)
    assert arrays["q"].nbytes < uniform["q"].nbytes * (int(variant[3]) / 8 + 0.1)


# The arrays the code before mixed precision wrote for student_state() (commit 0751ed0's encode):
# the course's 8-bit and 16-bit layouts must stay exactly these.
COURSE_ARRAYS_SHA1 = {8: "9e5514b44fa06993d0c2dea2ac535d2a4f25c2b3", 16: "ef0c36a8b3365a432a324a032a0bd595cd61fe47"}


def test_the_course_layouts_are_unchanged():
    """Per tensor (the course's 8 bit) the ranges stay float32, the codes are those of the
    formula in the docstring (computed by hand here), and every array is byte for byte what
    the code before this layout work wrote."""
    sd = student_state()
    for bits, expected in COURSE_ARRAYS_SHA1.items():
        arrays, h = encode(sd, bits), hashlib.sha1()
        for k in sorted(arrays):
            h.update(k.encode())
            h.update(str(arrays[k].dtype).encode())
            h.update(arrays[k].tobytes())
        assert h.hexdigest() == expected, bits
    arrays = encode(sd, 8)
    assert arrays["lo"].dtype == np.float32 and arrays["q"].dtype == np.uint8
    w = sd["cnn.0.0.weight"].double().reshape(-1).numpy()
    lo, hi = np.float32(w.min()), np.float32(w.max())
    expected = np.rint((w - lo) / (np.float64(hi) - lo) * 255).astype(np.uint8)
    assert np.array_equal(arrays["q"][:w.size], expected)
    assert qfile.json_of(arrays["meta"])["bits"] == 8


def test_8_bit_defaults_and_16_bit():
    sd = student_state()
    out = qfile.decode(npz_round_trip(encode(sd, 8)))
    assert torch.all(out["cnn.1.1.running_var"] == 0.7)   # constant: no division by zero
    assert int(out["cnn.2.1.num_batches_tracked"]) == 1234
    half = qfile.decode(npz_round_trip(encode(sd, 16)))
    for name, x in sd.items():
        assert torch.equal(half[name], x.half().to(x.dtype) if x.is_floating_point() else x)


def test_files_load_without_pickle_and_rebuild_the_model(tmp_path):
    model = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4).eval()
    sd = common.cpu_state_dict(model)
    path = tmp_path / "m.npz"
    qfile.save_quantized(path, encode(sd, 8, True), common.arch_of(model), {"norm": "imagenet"})
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    loaded, preprocess, _ = common.load_model(path)
    assert loaded.widths == model.widths and preprocess == {"norm": "imagenet"}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x), atol=0.05)


def test_8_bit_file_is_at_most_0_27_of_the_fp32_checkpoint(tmp_path):
    model = common.StudentNet()
    common.save_checkpoint(tmp_path / "s.pt", model, {"norm": "imagenet"})
    for compressed in (False, True):
        path = tmp_path / f"s{compressed}.npz"
        qfile.save_quantized(path, encode(common.cpu_state_dict(model), 8), common.arch_of(model),
                             {"norm": "imagenet"}, compressed=compressed)
        assert path.stat().st_size <= 0.27 * (tmp_path / "s.pt").stat().st_size


def test_packed_codes_are_dense():
    codes = np.random.default_rng(0).integers(0, 64, 1000).astype(np.uint8)
    packed = qfile.pack_bits(codes, 6)
    assert len(packed) == 750
    assert np.array_equal(qfile.unpack_bits(packed, 6, 1000), codes)


def test_a_damaged_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 nonsense")
    with pytest.raises(running.UserError, match="not a quantized model file"):
        common.load_model(tmp_path / "bad.npz")


@pytest.mark.parametrize("damage", ["empty", "damaged codes", "a list for a description"])
@pytest.mark.parametrize("read", [common.load_model, qfile.read_held], ids=["load_model", "read_held"])
def test_a_damaged_file_is_one_line_whichever_reads_it(tmp_path, damage, read):
    path = tmp_path / "m.npz"
    model = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4)
    qfile.save_quantized(path, encode(common.cpu_state_dict(model), 4), common.arch_of(model),
                         {"norm": "imagenet"}, compressed=True)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "damaged codes":
        blob = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as z:
            at = z.getinfo("q.npy").header_offset
        name, extra = (int.from_bytes(blob[at + i:at + i + 2], "little") for i in (26, 28))  # its local header's
        blob[at + 30 + name + extra] = 0xFF  # a deflate block of type 3, which none is: zlib's error, not zipfile's
        path.write_bytes(bytes(blob))
    else:
        np.savez(path, meta=qfile.json_array([1, 2]))
    with pytest.raises(running.UserError, match=f"^{re.escape(str(path))}: not a quantized model file"):
        read(path)


def test_a_bad_variant_is_a_one_line_error():
    with pytest.raises(running.UserError, match="qN, qNc or mixN"):
        settings.parse_list("q4c,q9", "variants", quant.VARIANT_PATTERN, what=quant.VARIANTS)


@pytest.mark.parametrize("variant", ["q8", "q4c", "q3", "q2c", "mix3"])
def test_qat_as_evaluated_is_the_decoded_file(variant, tmp_path):
    """The exactness test: a fake-quantized model in eval mode and the model decoded from its
    .npz give the same logits."""
    torch.manual_seed(3)
    model = common.StudentNet(widths=[6, 8, 10, 12, 14, 16, 18, 20], num_classes=5)
    for m in model.modules():  # BatchNorm statistics away from their 0/1 defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fq = quant.FakeQuant(model, variant).eval()
    path = tmp_path / "m.npz"
    qfile.save_quantized(path, quant.encode(model.state_dict(), variant),
                         common.arch_of(model), {"norm": "imagenet"})
    decoded = common.load_model(path)[0]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = fq(x), decoded.eval()(x)
    assert torch.equal(a, b), (a - b).abs().max()
    assert not torch.allclose(a, model.eval()(x), atol=1e-3)  # and it is not the float model


def test_a_short_qat_run_lowers_the_quantized_loss():
    """QAT lowers the loss of the 2-bit file, and ends far below the same training in float
    followed by post-training quantization."""
    x, y = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 3

    def file_loss(m):
        """Cross-entropy of the model decoded from its q2c file (train-mode BatchNorm)."""
        decoded = common.StudentNet(widths=m.widths, num_classes=3)
        decoded.load_state_dict(qfile.decode(npz_round_trip(quant.encode(m.state_dict(), "q2c"))))
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(decoded.train()(x), y).item()

    def trained(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is not None for p in model.parameters())  # QAT: the straight-through estimator
        plain = common.StudentNet(widths=model.widths, num_classes=3)
        plain.load_state_dict(model.state_dict())
        return plain
    torch.manual_seed(0)
    model = common.StudentNet(widths=[8, 8, 8, 8, 8, 8, 8, 8], num_classes=3)
    before = file_loss(model)
    qat = file_loss(trained(quant.FakeQuant(model, "q2c").train()))
    float_then_ptq = file_loss(trained(copy.deepcopy(model).train()))
    assert qat < before and qat < 0.6 * float_then_ptq


def test_the_front_is_the_files_nothing_beats():
    class S:
        def __init__(self, acc):
            self.acc = acc
    rows = [{"bytes": b, "val": S(a)} for b, a in [(100, 0.5), (200, 0.6), (150, 0.4), (300, 0.6), (50, 0.3)]]
    assert [r["front"] for r in reports.pareto(rows)] == ["*", "*", "", "", "*"]


def test_per_channel_ranges_fall_back_to_float32_beyond_float16():
    sd = student_state()
    sd["cnn.1.1.running_var"] = torch.full_like(sd["cnn.1.1.running_var"], 70000.0)
    arrays = encode(sd, 8, True)
    assert arrays["lo"].dtype == np.float32
    out = qfile.decode(npz_round_trip(arrays))
    assert torch.all(out["cnn.1.1.running_var"] == 70000.0)
    assert encode(student_state(), 8, True)["lo"].dtype == np.float16


def test_qat_on_a_channels_last_model_is_still_the_decoded_file(tmp_path):
    torch.manual_seed(4)
    model = common.StudentNet(widths=[6, 8, 10, 12, 14, 16, 18, 20], num_classes=5)
    fq = common.prepare(quant.FakeQuant(model, "mix3"), torch.device("cpu")).eval()  # as fit() holds it
    arrays = quant.encode(common.cpu_state_dict(fq), "mix3")
    decoded = common.StudentNet(widths=model.widths, num_classes=5)
    decoded.load_state_dict(qfile.decode(npz_round_trip(arrays)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fq(x), decoded.eval()(x))


def crafted(tmp_path, layout, craft):
    """A quantized file of a small student whose description or arrays `craft` has changed."""
    model = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4)
    sd = common.cpu_state_dict(model)
    arrays = npz_round_trip(encode(sd, *layout(sd)))
    meta = {**qfile.json_of(arrays["meta"]), "arch": common.arch_of(model), "preprocess": {"norm": "imagenet"}}
    craft(meta, arrays)
    path = tmp_path / "crafted.npz"
    np.savez(path, **{**arrays, "meta": qfile.json_array(meta)})
    return path


PER_TENSOR_4 = lambda sd: (4, False, None)  # noqa: E731
MIXED_3 = lambda sd: quant.layout_of("mix3", sd)  # noqa: E731
PER_CHANNEL_4 = lambda sd: (4, True, None)  # noqa: E731


def huge_ranges(meta, arrays):
    """Finite float16 ranges, but far beyond any weight's."""
    arrays["lo"][:], arrays["hi"][:] = -60000, 60000


@pytest.mark.parametrize("layout, craft, message", [
    (PER_TENSOR_4, lambda m, a: m.update(bits=0), "bits=0"),
    (PER_TENSOR_4, lambda m, a: m.update(bits=9), "bits=9"),
    (PER_TENSOR_4, lambda m, a: m.update(bits=True), "bits=True"),
    (PER_TENSOR_4, lambda m, a: m.update(per_channel="yes"), "per_channel='yes'"),
    (MIXED_3, lambda m, a: m["tensors"][0].update(bits=0), "has bits=0"),
    (PER_TENSOR_4, lambda m, a: m["tensors"][0].update(shape=[-3, 3, 3, 3]), "is described as"),
    (PER_TENSOR_4, lambda m, a: m["tensors"][0].update(store="pickle"), "is described as"),
    (PER_TENSOR_4, lambda m, a: m["tensors"][0].update(dtype="object"), "is described as"),
    (PER_TENSOR_4, lambda m, a: a.update(q=a["q"][:-1]), "array 'q' holds"),
    (PER_TENSOR_4, lambda m, a: a.update(lo=a["lo"][:-1]), "array 'lo' holds"),
    (PER_TENSOR_4, lambda m, a: a["lo"].__setitem__(0, np.nan), "not finite"),
    (PER_TENSOR_4, lambda m, a: a["hi"].__setitem__(0, a["lo"][0] - 1), "max is below its min"),
    (lambda sd: (16, False, None), lambda m, a: a["f16"].__setitem__(0, np.inf), "not finite"),
    (PER_TENSOR_4, lambda m, a: m.pop("arch"), "names no model"),
    (PER_TENSOR_4, lambda m, a: m["arch"].update(kind="vgg"), "unknown model kind 'vgg'"),
    (PER_TENSOR_4, lambda m, a: a.update(lo=a["lo"].reshape(-1, 1)), "array 'lo' is 2-D (shape (64, 1)); a 1-D"),
    (PER_CHANNEL_4, huge_ranges, "the model it decodes to gives logits that are not finite"),
    (PER_TENSOR_4, lambda m, a: m["preprocess"].update(img_size=-1), "img_size=-1"),
    (PER_TENSOR_4, lambda m, a: m["preprocess"].update(img_size="abc"), "img_size='abc'"),
    (PER_TENSOR_4, lambda m, a: m["preprocess"].update(img_size=1_000_000), "img_size=1000000"),
])
def test_a_crafted_file_is_a_one_line_error_never_a_nan_model(tmp_path, layout, craft, message):
    path = crafted(tmp_path, layout, craft)
    names_the_file = f"^{re.escape(str(path))}: not a quantized model file "
    with pytest.raises(running.UserError, match=f"{names_the_file}.*{re.escape(message)}"):
        common.load_model(path)


def test_05_says_a_damaged_or_crafted_file_in_one_line(sample_root, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    common.save_checkpoint(ck / "student_kd.pt", common.StudentNet(num_classes=11),
                           {"norm": "imagenet", "img_size": 16, "resize": 18, "select_fraction": 0.1})
    (ck / "empty.npz").write_bytes(b"")
    crafted(ck, PER_CHANNEL_4, huge_ranges).rename(ck / "huge.npz")
    for name, says in [("empty.npz", "empty.npz: not a quantized model file (No data left in file)"),
                       ("huge.npz", "huge.npz: not a quantized model file (the model it decodes to gives logits")]:
        run = run_script("05_deploy.py", f"--data_dir={sample_root}", f"--ckpt_dir={ck}",
                         f"--cache_dir={tmp_path / 'cache'}", f"--models={name}")
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and f"{ck / says}" in lines[0], run.stderr


@pytest.mark.parametrize("variant", ["q4c", "q3c", "q3", "q2c"])
def test_below_8_bits_the_batchnorm_vectors_and_biases_stay_at_8(variant):
    """A BatchNorm variance coded in 2-4 bits scales its channel wrongly; kept at 8 bits per
    tensor, every channel's scale 1/sqrt(var) stays within 2% over the spread a trained
    student has (variances from 0.01 to 0.1 in one BatchNorm, as in food101-10's)."""
    sd = student_state()
    var = 10 ** torch.empty_like(sd["cnn.3.1.running_var"]).uniform_(-2, -1, generator=torch.Generator().manual_seed(0))
    sd["cnn.3.1.running_var"] = var
    bits = int(variant[1])
    meta = qfile.json_of(quant.encode(sd, variant)["meta"])
    assert {s["name"]: s["bits"] for s in meta["tensors"] if "bits" in s} == {
        name: bits if t.ndim >= 2 else 8 for name, t in sd.items() if t.is_floating_point()}

    def scale_error(arrays):
        back = qfile.decode(npz_round_trip(arrays))["cnn.3.1.running_var"]
        return ((var + 1e-5) / (back + 1e-5)).sqrt().sub(1).abs().max()
    assert scale_error(quant.encode(sd, variant)) < 0.02
    assert scale_error(encode(sd, bits, variant.endswith("c"))) > 0.05  # every tensor at `bits`, as before
