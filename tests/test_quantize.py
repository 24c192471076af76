import io

import numpy as np
import pytest
import torch

import common
from conftest import load_script

quant = load_script("04_quantize.py")


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


@pytest.mark.parametrize("bits, per_channel", [(8, False), (8, True), (6, True), (4, False), (2, True)])
def test_every_element_is_within_half_a_step(bits, per_channel):
    sd = student_state()
    out = quant.decode(npz_round_trip(quant.encode(sd, bits, per_channel)))
    assert list(out) == list(sd)
    for name, x in sd.items():
        y = out[name]
        assert y.dtype == x.dtype and y.shape == x.shape
        if not x.is_floating_point():
            assert torch.equal(x, y)
            continue
        rows = x.reshape(x.shape[0], -1) if per_channel and x.ndim >= 2 else x.reshape(1, -1)
        span = (rows.max(1).values - rows.min(1).values)[:, None]
        err = (y.reshape(rows.shape) - rows).abs()
        assert (err <= span / (2 * (2 ** bits - 1)) + 1e-6).all(), name


def test_8_bit_defaults_and_16_bit():
    sd = student_state()
    out = quant.decode8(npz_round_trip(quant.encode8(sd)))
    assert torch.all(out["cnn.1.1.running_var"] == 0.7)   # constant: no division by zero
    assert int(out["cnn.2.1.num_batches_tracked"]) == 1234
    half = quant.decode16(npz_round_trip(quant.encode16(sd)))
    for name, x in sd.items():
        assert torch.equal(half[name], x.half().to(x.dtype) if x.is_floating_point() else x)


def test_files_load_without_pickle_and_rebuild_the_model(tmp_path):
    model = common.StudentNet(widths=[3, 4, 5, 6, 7, 8, 9, 10], num_classes=4).eval()
    sd = common.cpu_state_dict(model)
    path = tmp_path / "m.npz"
    quant.save_quantized(path, quant.encode8(sd, per_channel=True), common.arch_of(model), {"norm": "imagenet"})
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    loaded, preprocess = quant.load_quantized(path)
    assert loaded.widths == model.widths and preprocess == {"norm": "imagenet"}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x), atol=0.05)


def test_8_bit_file_is_at_most_0_27_of_the_fp32_checkpoint(tmp_path):
    model = common.StudentNet()
    common.save_checkpoint(tmp_path / "s.pt", model, {"norm": "imagenet"})
    for compressed in (False, True):
        path = tmp_path / f"s{compressed}.npz"
        quant.save_quantized(path, quant.encode8(common.cpu_state_dict(model)), common.arch_of(model),
                             {"norm": "imagenet"}, compressed=compressed)
        assert path.stat().st_size <= 0.27 * (tmp_path / "s.pt").stat().st_size


def test_packed_codes_are_dense():
    codes = np.random.default_rng(0).integers(0, 64, 1000).astype(np.uint8)
    packed = quant.pack_bits(codes, 6)
    assert len(packed) == 750
    assert np.array_equal(quant.unpack_bits(packed, 6, 1000), codes)


def test_a_damaged_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 nonsense")
    with pytest.raises(common.UserError, match="not a quantized model file"):
        quant.load_quantized(tmp_path / "bad.npz")
