"""The quantized file format: a state_dict as a few flat numpy arrays and a JSON description
(.npz, read with allow_pickle=False). Integer buffers as they are; floating tensors as float16,
or as b-bit codes (bit-packed) with a [lo, hi] range per tensor or per output channel, each
decoding to q / (2^b - 1) * (hi - lo) + lo. The description carries the model's arch and
preprocessing, so a file loads without being told the shape."""
import contextlib
import json
import math
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import torch

from support import files
from support.running import UserError


def encode(state_dict, bits, per_channel=False, plan=None, *, quantize):
    """Arrays for np.savez: 'meta' (JSON), 'ints' (integer buffers as they are), and either
    'f16' (bits=16) or 'q' (min-max codes, bit-packed) with 'lo'/'hi' (the ranges).

    per_channel: a range per output channel (row) of every tensor of 2 or more dimensions,
    stored as float16 (a float32 pair per row would cost more than 4-bit codes save); per
    tensor the ranges stay float32, as the course's files have them. plan: {name: bits} makes
    a mixed layout, each tensor at its own width (the others at `bits`), each recorded.
    quantize(x, bits, per_channel, range_dtype) -> (codes, lo, hi): the rule that makes the
    codes (04_quantize.py's min-max rule); this file only stores them."""
    if not (bits == 16 or 1 <= bits <= 8) or (plan and (bits == 16 or not all(1 <= b <= 8 for b in plan.values()))):
        raise ValueError(f"bits must be 16 or 1..8, got {bits}" + (f" and {sorted(set(plan.values()))}" if plan else ""))
    range_dtype = ranges_dtype(state_dict.values(), per_channel)
    specs, ints, floats, codes, los, his = [], [], [], [], [], []
    for name, t in state_dict.items():
        x = t.detach().cpu()
        spec = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if not x.is_floating_point():
            spec["store"] = "ints"
            ints.append(x.reshape(-1).to(torch.int64).numpy())
        elif bits == 16:
            spec["store"] = "f16"
            floats.append(x.reshape(-1).to(torch.float16).numpy())
        else:
            spec["store"] = "q"
            b = plan.get(name, bits) if plan else bits
            q, lo, hi = quantize(x, b, per_channel and x.ndim >= 2, range_dtype)
            q = q.to(torch.uint8).reshape(-1).numpy()
            codes.append(pack_bits(q, b) if plan else q)
            los.append(lo.numpy())
            his.append(hi.numpy())
            if plan:
                spec["bits"] = b
        specs.append(spec)
    meta = {"bits": "mixed" if plan else bits, "per_channel": per_channel, "tensors": specs}
    arrays = {"ints": concat(ints, np.int64)}
    if bits == 16:
        arrays["f16"] = concat(floats, np.float16)
    else:
        arrays["q"] = concat(codes, np.uint8) if plan else pack_bits(concat(codes, np.uint8), bits)
        dtype = np.float16 if range_dtype == torch.float16 else np.float32
        arrays["lo"], arrays["hi"] = concat(los, dtype), concat(his, dtype)
    arrays["meta"] = json_array(meta)
    return arrays


def ranges_dtype(tensors, per_channel):
    """How a file stores its ranges: float16 per channel (float32 pairs would cost a fifth of a
    4-bit file), unless a value lies beyond float16's range; float32 per tensor, as the course's."""
    big = any(t.is_floating_point() and t.numel() and t.detach().abs().max() > 65504 for t in tensors)
    return torch.float16 if per_channel and not big else torch.float32


def json_array(obj):
    """JSON as UTF-8 bytes: a unicode array would spend 4 bytes a character."""
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def json_of(array):
    return json.loads(array.tobytes().decode())


def dequantize(q, lo, hi, bits, shape, dtype=torch.float32, compute=torch.float64):
    """The values codes q (rows x n) stand for: q / (2^bits - 1) * (hi - lo) + lo, computed in
    `compute` (a file: float64; fake quantization on a device: float32)."""
    lo_c, hi_c = lo.to(compute)[:, None], hi.to(compute)[:, None]
    return (q.to(compute) / (2 ** bits - 1) * (hi_c - lo_c) + lo_c).to(dtype).reshape(shape)


DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def check_description(meta, arrays):
    """Every field of a file's description, and the arrays' lengths it implies, checked before
    decoding: a crafted or damaged file is an error, never a model of NaNs. Raises ValueError."""
    if not isinstance(meta, dict):
        raise ValueError("its description is not a JSON object")
    bits, per_channel, specs = meta.get("bits"), meta.get("per_channel"), meta.get("tensors")
    if bits not in ("mixed", 16, *range(1, 9)) or type(bits) is bool or not isinstance(per_channel, bool) \
            or not isinstance(specs, list):
        raise ValueError(f"its description has bits={bits!r}, per_channel={per_channel!r}")
    need = {"ints": 0, "f16": 0, "q": 0, "lo": 0}
    for s in specs:
        if not isinstance(s, dict):
            raise ValueError(f"a tensor is described as {s!r}")
        shape, store = s.get("shape"), s.get("store")
        if not isinstance(s.get("name"), str) or not isinstance(shape, list) \
                or not all(type(d) is int and d >= 0 for d in shape) or s.get("dtype") not in DTYPES \
                or store not in ("ints", "f16", "q") or (store == "q" and bits == 16) or (store == "f16" and bits != 16):
            raise ValueError(f"tensor {s.get('name')!r} is described as {s}")
        n = math.prod(shape)
        if store == "q":
            b = s.get("bits") if bits == "mixed" else bits
            if b not in range(1, 9) or type(b) is bool:
                raise ValueError(f"tensor {s['name']!r} has bits={b!r}")
            need["q"] += math.ceil(n * b / 8) if bits == "mixed" else n
            need["lo"] += shape[0] if per_channel and len(shape) >= 2 else 1
        else:
            need[store] += n
    if bits not in ("mixed", 8, 16):
        need["q"] = math.ceil(need["q"] * bits / 8)
    need["hi"] = need["lo"]
    for name, count in need.items():
        if name in arrays and arrays[name].ndim != 1:
            raise ValueError(f"array {name!r} is {arrays[name].ndim}-D (shape {arrays[name].shape}); "
                             "a 1-D array is needed")
        have = arrays[name].size if name in arrays else 0
        if have != count:
            raise ValueError(f"array {name!r} holds {have} values where its description needs {count}")
    if need["lo"] and not (np.isfinite(arrays["lo"]).all() and np.isfinite(arrays["hi"]).all()
                           and (arrays["hi"] >= arrays["lo"]).all()):
        raise ValueError("its ranges are not finite, or a max is below its min")


class Codes(NamedTuple):
    """A tensor as b-bit codes: row r of q (rows x n/rows, uint8) decodes with [lo[r], hi[r]]."""
    q: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    bits: int


def stored(arrays):
    """{name: (spec, what the file holds for it)}: an int64 or float16 array, or Codes; the
    description checked first."""
    meta = json_of(arrays["meta"])
    check_description(meta, arrays)
    mixed, per_channel = meta["bits"] == "mixed", meta["per_channel"]
    specs = meta["tensors"]
    if not mixed:
        q_count = sum(math.prod(s["shape"]) for s in specs if s["store"] == "q")
        codes = unpack_bits(arrays["q"], meta["bits"], q_count) if q_count else None
    offsets = {"ints": 0, "f16": 0, "q": 0, "range": 0}
    out = {}
    for s in specs:
        n, shape, store = math.prod(s["shape"]), s["shape"], s["store"]
        start = offsets[store]
        if store in ("ints", "f16"):
            offsets[store] += n
            out[s["name"]] = (s, arrays[store][start:start + n])
            continue
        bits = s["bits"] if mixed else meta["bits"]
        if mixed:  # each tensor's codes packed on their own
            offsets[store] += math.ceil(n * bits / 8)
            q = unpack_bits(arrays["q"][start:offsets[store]], bits, n)
        else:
            offsets[store] += n
            q = codes[start:start + n]
        rows = shape[0] if per_channel and len(shape) >= 2 else 1
        r = offsets["range"]
        offsets["range"] += rows
        q = q.astype(np.uint8).reshape(rows, n // max(rows, 1))
        out[s["name"]] = (s, Codes(q, arrays["lo"][r:r + rows], arrays["hi"][r:r + rows], bits))
    return out


def decode(arrays):
    """The state_dict of encode(): codes back to floats, float16 back to float32."""
    sd = {}
    for name, (spec, held) in stored(arrays).items():
        dtype, shape = getattr(torch, spec["dtype"]), spec["shape"]
        if isinstance(held, Codes):
            lo, hi = (torch.from_numpy(a.copy()) for a in (held.lo, held.hi))
            sd[name] = dequantize(torch.from_numpy(held.q.astype(np.float64)), lo, hi, held.bits, shape, dtype)
        else:
            values = held.astype(np.float32) if spec["store"] == "f16" else held.copy()
            sd[name] = torch.from_numpy(values).to(dtype).reshape(shape)
    if not all(t.isfinite().all() for t in sd.values() if t.is_floating_point()):
        raise ValueError("it decodes to values that are not finite")
    return sd


def concat(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def pack_bits(codes, bits):
    """Codes of `bits` bits each into a dense byte string (8-bit codes stay as they are)."""
    if bits == 8:
        return codes
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.packbits(((codes[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_bits(packed, bits, count):
    if bits == 8:
        return packed[:count]
    bitmat = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    return bitmat.astype(np.uint16) @ (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)


# ---- files ----------------------------------------------------------------------------------

def save_quantized(path, arrays, arch, preprocess, compressed=False):
    meta = {**json_of(arrays["meta"]), "arch": arch, "preprocess": preprocess}
    arrays = {**arrays, "meta": json_array(meta)}
    save = np.savez_compressed if compressed else np.savez
    files.atomic_write(path, lambda f: save(f, **arrays))


def read_quantized(path, build):
    """(model, meta) from a quantized .npz, without pickle; build(arch) makes the empty model."""
    with read_errors(path):
        arrays = load_arrays(path)
        meta = json_of(arrays["meta"])
        if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict):
            raise ValueError("its description names no model")
        model = build(meta["arch"])
        model.load_state_dict(decode(arrays))
    return model, meta


def read_held(path):
    """{name: Codes or a float16 array} of a quantized .npz's float tensors, as the file holds them."""
    with read_errors(path):
        return {name: held if isinstance(held, Codes) else held.reshape(spec["shape"])
                for name, (spec, held) in stored(load_arrays(path)).items() if spec["store"] != "ints"}


def load_arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# What reading a damaged or crafted file can raise: numpy's and zipfile's errors (an empty file is
# an EOFError, a flipped byte in a compressed one a zlib.error), and the model's on odd values.
DAMAGED = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, ArithmeticError,
           RuntimeError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def read_errors(path):
    """A missing or damaged file as one line."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run 04_quantize.py first") from None
    except DAMAGED as e:
        said = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a quantized model file ({said})") from None
