"""Stage 4 - weight quantization, and the final model.

16 bit: every floating tensor as float16. 8 bit: per tensor, min-max normalise, times 255,
rounded to uint8, min and max stored beside; decoding restores q/255*(max-min)+min. Beyond the
homework: per-output-channel ranges and 6/4-bit packed codes, each also zip-compressed, so the
bytes-vs-accuracy cliff shows. Files are .npz (np.load(..., allow_pickle=False)) and carry the
model's arch and preprocessing, so they load without being told the shape.

The final model is the smallest file within max_acc_drop of student_kd's accuracy on the
selection split (held out of training; validation only reports). It writes
checkpoints/predictions.csv in the course's format, and the script ends with the table of every
stage and each stage against the one before on the same validation images.

    python 04_quantize.py
"""
import json
import math
import zipfile
from pathlib import Path

import common  # first: Ctrl-C during the slow imports is then a clean exit
import numpy as np
import torch

# --- settings (each can be overridden as --name=value) -------------------------------------
data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
recipe = "ours"  # ours, or course: the homework's choices in one word (native-scale 256 crops, rotation 15, no jitter, no normalisation, constant lr 1e-3, batch 32, ...; README); each still overridable
img_size = 224  # crop size (pixels); student_kd.pt's record wins unless given
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; student_kd.pt's record wins unless given
batch_size = 64  # images per evaluation step
models = "student_kd,student_pruned"  # checkpoints (in ckpt_dir) to quantize; missing ones are skipped
variants = "fp16,q8,q8c,q6c,q4c"  # fp16; qN = N-bit per tensor; qNc = N-bit per output channel
max_acc_drop = 0.01  # the final model: the smallest file within this of student_kd's accuracy on the selection split
select_fraction = 0.1  # share of training held out to choose the final file; student_kd.pt's record wins unless given
device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
ckpt_dir = "checkpoints"  # where checkpoints and results.json go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off


# ============================================================================================
# Codecs: a state_dict <-> a few flat numpy arrays and a JSON description
# ============================================================================================

def encode16(state_dict):
    return encode(state_dict, 16)


def encode8(state_dict, per_channel=False):
    return encode(state_dict, 8, per_channel)


def encode(state_dict, bits, per_channel=False):
    """Arrays for np.savez: 'meta' (JSON), 'ints' (integer buffers as they are), and either
    'f16' (bits=16) or 'q' (min-max codes, bit-packed) with 'lo'/'hi' (the ranges)."""
    if not (bits == 16 or 1 <= bits <= 8):
        raise ValueError(f"bits must be 16 or 1..8, got {bits}")
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
            q, lo, hi = minmax_codes(x.double().numpy(), bits, per_channel and x.ndim >= 2)
            codes.append(q)
            los.append(lo)
            his.append(hi)
        specs.append(spec)
    meta = {"bits": bits, "per_channel": per_channel, "tensors": specs}
    arrays = {"ints": concat(ints, np.int64)}
    if bits == 16:
        arrays["f16"] = concat(floats, np.float16)
    else:
        arrays["q"] = pack_bits(concat(codes, np.uint8), bits)
        arrays["lo"], arrays["hi"] = concat(los, np.float32), concat(his, np.float32)
    arrays["meta"] = json_array(meta)
    return arrays


def json_array(obj):
    """JSON as UTF-8 bytes: a unicode array would spend 4 bytes a character."""
    return np.frombuffer(json.dumps(obj, separators=(",", ":")).encode(), dtype=np.uint8)


def json_of(array):
    return json.loads(array.tobytes().decode())


def minmax_codes(x, bits, per_channel):
    """(codes, lo, hi): round((x - lo) / (hi - lo) * (2^bits - 1)), per tensor or per row."""
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    lo, hi = rows.min(axis=1).astype(np.float32), rows.max(axis=1).astype(np.float32)
    span = np.where(hi > lo, hi.astype(np.float64) - lo, 1.0)  # a constant tensor codes as 0
    levels = 2 ** bits - 1
    q = np.rint((rows - lo[:, None]) / span[:, None] * levels)
    return np.clip(q, 0, levels).astype(np.uint8).reshape(-1), lo, hi


def decode(arrays):
    """The state_dict of encode(): codes back to floats, float16 back to float32."""
    meta = json_of(arrays["meta"])
    bits, per_channel = meta["bits"], meta["per_channel"]
    specs = meta["tensors"]
    q_count = sum(math.prod(s["shape"]) for s in specs if s["store"] == "q")
    codes = unpack_bits(arrays["q"], bits, q_count) if q_count else None
    offsets = {"ints": 0, "f16": 0, "q": 0, "range": 0}
    levels = 2 ** bits - 1
    sd = {}
    for s in specs:
        n, shape, store = math.prod(s["shape"]), s["shape"], s["store"]
        start = offsets[store]
        offsets[store] += n
        if store == "ints":
            sd[s["name"]] = torch.from_numpy(arrays["ints"][start:start + n].copy()).to(
                getattr(torch, s["dtype"])).reshape(shape)
            continue
        if store == "f16":
            values = arrays["f16"][start:start + n].astype(np.float32)
        else:
            rows = shape[0] if per_channel and len(shape) >= 2 else 1
            r = offsets["range"]
            offsets["range"] += rows
            lo = arrays["lo"][r:r + rows].astype(np.float64)[:, None]
            hi = arrays["hi"][r:r + rows].astype(np.float64)[:, None]
            q = codes[start:start + n].reshape(rows, -1).astype(np.float64)
            values = (q / levels * (hi - lo) + lo).astype(np.float32)
        sd[s["name"]] = torch.from_numpy(values.reshape(shape)).to(getattr(torch, s["dtype"]))
    return sd


decode16 = decode8 = decode


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


# ============================================================================================
# Files: .npz with the arch and preprocessing inside
# ============================================================================================

def save_quantized(path, arrays, arch, preprocess, compressed=False):
    meta = {**json_of(arrays["meta"]), "arch": arch, "preprocess": preprocess}
    arrays = {**arrays, "meta": json_array(meta)}
    save = np.savez_compressed if compressed else np.savez
    common.atomic_write(path, lambda f: save(f, **arrays))


def load_quantized(path):
    """(model, preprocess) from a quantized .npz, without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json_of(arrays["meta"])
        model = common.build_model(meta["arch"])
        model.load_state_dict(decode(arrays))
    except FileNotFoundError:
        raise common.UserError(f"{path}: not found; run 04_quantize.py first") from None
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as e:
        raise common.UserError(f"{path}: not a quantized model file ({str(e).splitlines()[0][:100]})") from None
    return model, {"norm": common.STUDENT_NORM, **meta.get("preprocess", {})}


SELECT_COLUMN = "selection acc [95% CI]"
VARIANTS = {"fp16": (16, False), "q8": (8, False), "q8c": (8, True), "q6c": (6, True),
            "q4c": (4, True), "q4": (4, False), "q6": (6, False), "q2c": (2, True)}


def parse_list(text, name, allowed=None):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or (allowed and not set(items) <= set(allowed)):
        raise common.UserError(f"--{name}={text!r}: give a comma-separated list"
                               + (f" from {', '.join(allowed)}" if allowed else ""))
    return items


# ============================================================================================
# Quantize, measure, choose the final model
# ============================================================================================

def main():
    cfg = common.configure(globals())
    names = parse_list(cfg.models, "models")
    variants = parse_list(cfg.variants, "variants", VARIANTS)
    ckpt_dir = common.ensure_writable(cfg.ckpt_dir)
    recorded = common.adopt_from(cfg, ckpt_dir / "student_kd.pt", "02_distill.py")
    data = common.data_for(cfg, recorded=recorded)
    device = common.pick_device(cfg.device)
    score = common.Scorer(data, cfg, device)

    def load(name):
        """(model, its preprocessing with any sizes given on the command line)."""
        made_by = "03_prune.py" if "pruned" in name else "02_distill.py"
        model, preprocess, _ = common.load_model(ckpt_dir / f"{name}.pt", "student", data.num_classes,
                                                 made_by=made_by)
        if name != "student_kd":  # student_kd's selection was checked when the data was loaded
            common.check_selection(data, preprocess, f"{name}.pt")
        return model, common.as_given(cfg, preprocess)

    kd_val, kd_select = score.both(*load("student_kd"))  # the reference every file is held to
    rows, candidates, records, outputs = [], [], [], []  # candidates: {bytes, select, val, path}
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.exists() and name != "student_kd":
            print(f"{path.name} not found; skipped")
            continue
        model, preprocess = load(name)
        val, select = (kd_val, kd_select) if name == "student_kd" else score.both(model, preprocess)
        rows.append({"model": name, "variant": "fp32 .pt", "bytes": common.file_bytes(path),
                     common.VAL_COLUMN: val, SELECT_COLUMN: select})
        candidates.append({"bytes": common.file_bytes(path), "select": select.acc, "val": val, "path": path})
        sd = common.cpu_state_dict(model)
        for variant in variants:
            arrays = encode(sd, *VARIANTS[variant])
            plain, packed = ckpt_dir / f"{name}.{variant}.npz", ckpt_dir / f"{name}.{variant}.z.npz"
            save_quantized(common.new_path(plain), arrays, common.arch_of(model), preprocess)
            save_quantized(common.new_path(packed), arrays, common.arch_of(model), preprocess, compressed=True)
            decoded, _ = load_quantized(common.new_path(plain))
            val, select = score.both(decoded, preprocess)
            sizes = common.file_bytes(common.new_path(plain)), common.file_bytes(common.new_path(packed))
            rows.append({"model": name, "variant": variant, "bytes": sizes[0], "bytes_zip": sizes[1],
                         common.VAL_COLUMN: val, SELECT_COLUMN: select})
            candidates += [{"bytes": size, "select": select.acc, "val": val, "path": p}
                           for size, p in zip(sizes, (plain, packed))]
            crop = preprocess.get("img_size", cfg.img_size)
            records.append(common.model_record("4 quantization", f"{name}.{variant}", decoded,
                                               common.new_path(plain), val, crop, bytes_zip=sizes[1],
                                               select_acc=round(select.acc, 4), chosen_on=data.chosen_on))
            outputs += [plain, packed]
    print(f"\nquantized models (accuracy after decoding, fp32; validation {kd_val.n} images, "
          f"selection {len(data.select.labels)})")
    print(common.format_table(rows, ["model", "variant", "bytes", "bytes_zip", common.VAL_COLUMN, SELECT_COLUMN]))

    # --- the final model: the smallest file within max_acc_drop of student_kd, on selection ----
    fits = [c for c in candidates if c["select"] >= kd_select.acc - cfg.max_acc_drop]
    if not fits:
        common.warn(f"no file is within max_acc_drop={cfg.max_acc_drop} of student_kd ({kd_select.acc:.4f} "
                    "on the selection split); taking the most accurate one there")
    final = (min(fits, key=lambda c: (c["bytes"], -c["select"])) if fits
             else max(candidates, key=lambda c: c["select"]))
    print(f"\nfinal model, chosen on {data.chosen_on}: {final['path'].name}: {final['bytes']:,} bytes, "
          f"val acc {final['val']} (selection {final['select']:.4f}; student_kd {kd_select.acc:.4f} there, "
          f"allowed drop {cfg.max_acc_drop})")
    records.append({"stage": "4 quantization", "model": "final", "file": final["path"].name,
                    "bytes": final["bytes"], **common.score_fields(final["val"]),
                    "select_acc": round(final["select"], 4), "chosen_on": data.chosen_on})
    outputs += write_submission(final["path"], final["path"] in outputs, data, cfg, ckpt_dir, device)
    written = common.publish(ckpt_dir, outputs, records)
    print_summary(ckpt_dir, data)
    print(f"\nwrote {len(outputs)} files in {ckpt_dir} (*.npz, *.z.npz"
          + (", predictions.csv" if data.test is not None else "") + f") and {written[-1]}")


def write_submission(path, written_now, data, cfg, ckpt_dir, device):
    """predictions.csv (as a .new file) from the final model, read from its .new file when this
    run wrote it; returns what to publish."""
    if data.test is None:
        common.warn(f"{data.root} has no testing/ split; no predictions written")
        return []
    source = common.new_path(path) if written_now else path
    model, preprocess = load_quantized(source) if path.suffix == ".npz" else common.load_model(source)[:2]
    test, crop = data.test, preprocess.get("img_size", cfg.img_size)
    stored = common.storage(preprocess.get("resize", common.resize_of(cfg)), crop)
    if stored != common.storage(common.resize_of(cfg), cfg.img_size):
        test = common.load_split(cfg.data_dir, "testing", stored[0], False, cfg.get("cache_dir"), stored[1])
    preds = common.predict(common.prepare(model, device), test.images.to(device), cfg.batch_size, crop,
                           preprocess["norm"])
    out = ckpt_dir / "predictions.csv"
    count, unreadable = common.write_predictions(common.new_path(out), test, preds)
    print(f"predictions for {count} testing images -> {out}"
          + (f" ({unreadable} unreadable images given class 0)" if unreadable else ""))
    return [out]


def print_summary(ckpt_dir, data):
    """Every stage's record, then each stage against the one before on the same images."""
    records = common.read_results(ckpt_dir)
    rows = [{**r, common.VAL_COLUMN: common.recorded_score(r) or r.get("val_acc")}
            for r in sorted(records, key=lambda r: str(r.get("stage"))) if r["model"] != "final"]
    print(f"\nevery stage ({Path(ckpt_dir) / common.RESULTS}; validation reports, {data.chosen_on} chose)")
    print(common.format_table(rows, ["stage", "model", "params", "bytes", "bytes_zip", "macs", common.VAL_COLUMN]))
    by_name = {r["model"]: r for r in records}
    final_name = f"final file ({by_name.get('final', {}).get('file', '?')})"
    steps = [("student_scratch", "student_kd"), ("student_kd", "student_pruned"), ("student_pruned", "final")]
    pairs = []
    for a, b in steps:
        sa, sb = (common.recorded_score(by_name[m]) if m in by_name else None for m in (a, b))
        if sa is None or sb is None or sa.key != sb.key or sa.n != sb.n:
            continue  # a stage not run, or scored on other images
        pairs.append(common.paired_row(a, sa, final_name if b == "final" else b, sb))
    if pairs:
        print(f"\neach stage against the one before, on the same {data.val.labels.numel()} validation images "
              "(paired bootstrap interval, exact McNemar test)")
        print(common.format_table(pairs, list(pairs[0])))


if __name__ == "__main__":
    common.run(main)
