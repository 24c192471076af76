"""Stage 5 - deployment: the compressed model in a runtime that needs no PyTorch, and the speed
each stage buys.

Exports student_kd, student_pruned and the final file 04 chose to ONNX: fp32, uint8 RGB centre
crops in (the normalisation inside the graph), the crop and stored size in the file's metadata.
A quantized file goes in as its b-bit codes (a float16 file as float16), which ONNX Runtime
decodes into float weights when a session starts (the final model's .onnx file is a sixth of a
float one, and as fast); a .pt checkpoint as float weights, BatchNorm folded into the
convolutions. And a static int8 version of each (QDQ, per channel, activation ranges calibrated
on training images). Checks that ONNX Runtime predicts what the decoded PyTorch model predicts
on validation, then times every model in PyTorch (eager, channels_last) and ONNX Runtime (fp32,
int8) on the same pinned threads, interleaved: latency at batch 1, throughput at batch 64, as
ratios to student_kd in PyTorch; ends with each model in its fastest runtime.
predict.py classifies a folder of images with one .onnx file, without PyTorch.

    python 05_deploy.py
    python predict.py --model=checkpoints/final.onnx --folder=data/food-11/testing
"""
import copy

import common  # first: Ctrl-C during the slow imports is then a clean exit
import numpy as np
import torch

from support import deploy, files, qfile, reports
from support.running import UserError, run
from support.settings import adopt_from, configure, parse_list, resize_of
from support.images import centre_crop
from support.stats import Score

# --- settings (each can be overridden as --name=value) -------------------------------------
models = "student_kd,student_pruned,final"  # checkpoints or quantized files in ckpt_dir; final = the file 04 chose; the first is the reference
int8 = True  # also a static int8 ONNX model of each (QDQ, per channel); it pays on CPUs with VNNI and on ARM
calibration_images = 256  # training images that calibrate the int8 activation ranges
batch_size = 64  # the throughput batch
repeats = 15  # interleaved timing rounds; the median is reported, with the min-max range
threads = 2  # threads of every runtime (torch.set_num_threads, ONNX Runtime's intra-op threads)
min_agreement = 0.995  # the fp32 ONNX model must predict what the decoded PyTorch model predicts on this share of validation
img_size = 224  # crop size (pixels); student_kd.pt's record unless you set it
resize = 0  # shorter side stored before cropping; 0 = img_size * 8/7; -1 = native scale; student_kd.pt's record unless you set it
select_fraction = 0.1  # share of training held out as the selection split; student_kd.pt's record unless you set it

data_dir = "data/food-11"  # Food-11 layout: training/, validation/, testing/
ckpt_dir = "checkpoints"  # where the models and results.json are, and the .onnx files go
cache_dir = "data/cache"  # decoded-image cache; "" turns it off


# ============================================================================================
# What the .onnx file computes
# ============================================================================================

class Deployed(torch.nn.Module):
    """uint8 N x S x S x 3 RGB crops in, logits out; the model's normalisation inside, so that a
    runtime needs nothing but the crop: the mean taken from the raw values, then one scale
    (1/255, 1/std), which an exported graph moves into the first convolution's weights
    (support/deploy.py). channels_last: the layout PyTorch's fast CPU kernels like. Works on a
    copy of `model`."""

    def __init__(self, model, norm, channels_last=False):
        super().__init__()
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).eval().to(memory_format=self.layout)
        imagenet = norm == "imagenet"
        self.shift = 255 * torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1) if imagenet else None
        self.scale = 1 / (255 * torch.tensor(common.IMAGENET_STD if imagenet else (1.0,) * 3).view(1, 3, 1, 1))

    def forward(self, crops):
        x = crops.permute(0, 3, 1, 2).float()
        x = x if self.shift is None else x - self.shift
        return self.model((x * self.scale).contiguous(memory_format=self.layout))


def calibration_crops(images, count, crop):
    """`count` centre crops spread evenly over a split (its files come in class order, so the
    first `count` would be one class)."""
    pick = torch.linspace(0, len(images) - 1, min(count, len(images))).long()
    return centre_crop(images[pick].cpu().numpy(), crop)


def batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


# ============================================================================================
# Export, check, time
# ============================================================================================

def model_paths(names, ckpt_dir):
    """{name: the file to deploy}; `final` is the file 04 chose, as results.json records it."""
    paths = {}
    stems = [n.removesuffix(".pt").removesuffix(".npz") for n in names]
    if len(set(stems)) < len(stems):
        raise UserError(f"--models={','.join(names)}: two of them would write the same .onnx file")
    for name in names:
        if name == "final":
            record = next((r for r in files.read_results(ckpt_dir)
                           if r["model"] == "final" and files.stage_of(r) == "4"), None)
            if record is None:
                raise UserError(f"{ckpt_dir / files.RESULTS}: no final file recorded; run 04_quantize.py first")
            paths[name] = ckpt_dir / record["file"]
        else:
            if "." in name and not name.endswith((".pt", ".npz")):
                raise UserError(f"--models: {name}: 05 deploys our checkpoints (.pt) and quantized files (.npz)")
            paths[name] = ckpt_dir / (name if "." in name else f"{name}.pt")
        files.require(paths[name], "04_quantize.py" if name == "final" else "03_prune.py or 04_quantize.py")
    return paths


def export(name, path, model, preprocess, data, score, cfg, ckpt_dir):
    """Write <name>.onnx (and <name>.int8.onnx); {runtime: (session, onnx path)}. A quantized
    file's codes go into the .onnx file as they are (support/deploy.with_codes)."""
    crop = preprocess["img_size"]
    meta = {"img_size": crop, "resize": preprocess["resize"], "classes": data.class_names, "source": path.name,
            "input": "uint8 N x img_size x img_size x 3, RGB centre crops of images stored at resize"}
    name = name.removesuffix(".pt").removesuffix(".npz")
    onnx_path = ckpt_dir / f"{name}.onnx"
    example = torch.zeros(1, crop, crop, 3, dtype=torch.uint8)
    module = Deployed(model, preprocess["norm"])
    codes = qfile.read_held(path) if path.suffix == ".npz" else {}
    fp32 = deploy.onnx_bytes(module, example, meta) if cfg.int8 or not codes else None  # int8 starts from float weights
    blob = deploy.with_codes(deploy.onnx_bytes(module, example, meta, by_name=True),
                             {f"model.{k}": c for k, c in codes.items()}) if codes else fp32
    files.atomic_write(files.new_path(onnx_path), lambda f: f.write(blob))
    out = {"ONNX Runtime fp32": onnx_path}
    if cfg.int8:
        out["ONNX Runtime int8"] = ckpt_dir / f"{name}.int8.onnx"
        calibration = calibration_crops(score.images(preprocess, "train")[0], cfg.calibration_images, crop)
        deploy.quantize_int8(fp32, files.new_path(out["ONNX Runtime int8"]), batches(calibration, cfg.batch_size))
    return {runtime: (deploy.session(files.new_path(p), cfg.threads), p) for runtime, p in out.items()}


def timed(runners, cfg):
    """{(model, runtime): (seconds at batch 1 [per round], seconds at batch_size [per round])}."""
    one = deploy.interleaved_times({k: v[0] for k, v in runners.items()}, cfg.repeats, calls=10)
    many = deploy.interleaved_times({k: v[1] for k, v in runners.items()}, cfg.repeats)
    return {k: (one[k], many[k]) for k in runners}


def main():
    cfg = configure(globals())
    names = parse_list(cfg.models, "models")
    ckpt_dir = files.ensure_writable(cfg.ckpt_dir)
    adopt_from(cfg, ckpt_dir / "student_kd.pt", "02_distill.py")
    paths = model_paths(names, ckpt_dir)
    torch.set_num_threads(cfg.threads)
    data = common.data_for(cfg, splits=("training", "validation"))
    score = common.Scorer(data, cfg, torch.device("cpu"))
    runners, rows, records, outputs = {}, [], [], []
    for name, path in paths.items():
        model, preprocess, _ = common.load_model(path, "student", data.num_classes)
        preprocess = {**preprocess, "img_size": preprocess.get("img_size") or cfg.img_size,
                      "resize": preprocess.get("resize") or resize_of(cfg)}
        images, labels, key = score.images(preprocess)
        crops = centre_crop(images.cpu().numpy(), preprocess["img_size"])
        torch_pred = common.logits_of(model, images, cfg.batch_size, preprocess["img_size"], preprocess["norm"]).argmax(1)
        torch_val = Score((torch_pred == labels.cpu()).numpy(), key)
        sessions = export(name, path, model, preprocess, data, score, cfg, ckpt_dir)
        x1, xb = crops[:1], crops[:cfg.batch_size]
        for channels_last, runtime in ((False, "PyTorch eager"), (True, "PyTorch channels_last")):
            module = Deployed(model, preprocess["norm"], channels_last)
            t1, tb = torch.from_numpy(x1), torch.from_numpy(xb)
            runners[name, runtime] = (lambda m=module, x=t1: m(x), lambda m=module, x=tb: m(x))
            rows.append({"model": name, "runtime": runtime, "file": path, "val": torch_val})
        for runtime, (sess, onnx_path) in sessions.items():
            pred = deploy.logits(sess, batches(crops, cfg.batch_size)).argmax(1)
            agreement = float((pred == torch_pred.numpy()).mean())
            if runtime.endswith("fp32") and agreement < cfg.min_agreement:
                raise UserError(f"{onnx_path.name}: ONNX Runtime predicts what the decoded PyTorch model predicts on "
                                f"only {agreement:.4f} of validation (min_agreement={cfg.min_agreement})")
            runners[name, runtime] = (lambda s=sess: s.run(None, {deploy.INPUT: x1}),
                                      lambda s=sess: s.run(None, {deploy.INPUT: xb}))
            val = Score(pred == labels.cpu().numpy(), key)
            rows.append({"model": name, "runtime": runtime, "file": files.new_path(onnx_path), "val": val,
                         "agrees": f"{agreement:.4f}"})
            records.append({"stage": "5 deployment", "model": onnx_path.name, "file": onnx_path.name,
                            "bytes": files.file_bytes(files.new_path(onnx_path)), "source": path.name,
                            "agreement": round(agreement, 4), **reports.score_fields(val)})
            outputs.append(onnx_path)
    with torch.inference_mode():
        times = timed(runners, cfg)
    print_speed(rows, times, names[0], len(xb), cfg)
    files.say_written(files.publish(ckpt_dir, outputs, records))


def print_speed(rows, times, reference, batch, cfg):
    """The table of every model in every runtime, the ratios to `reference` in PyTorch eager,
    each runtime's accuracy against it, paired, and last each model in its fastest runtime."""
    base_one, base_many = (np.median(t) for t in times[reference, "PyTorch eager"])
    table = []
    for r in rows:
        one, many = times[r["model"], r["runtime"]]
        table.append({"model": r["model"], "runtime": r["runtime"],
                      "ms @1": f"{1000 * np.median(one):.2f} ({1000 * min(one):.2f}-{1000 * max(one):.2f})",
                      f"img/s @{batch}": f"{batch / np.median(many):,.0f} ({batch / max(many):,.0f}-{batch / min(many):,.0f})",
                      "speed @1": f"{base_one / np.median(one):.2f}x", f"speed @{batch}":
                      f"{base_many / np.median(many):.2f}x", "file bytes": files.file_bytes(r["file"]),
                      reports.VAL_COLUMN: r["val"], "agrees with PyTorch": r.get("agrees", ""), "_ms": np.median(one)})
    print(f"\n{cfg.threads} threads in every runtime; {cfg.repeats} interleaved rounds, median (min-max); speed: "
          f"against {reference} in PyTorch eager, measured in this run")
    print(reports.format_table(table, [c for c in table[0] if c != "_ms"]))
    base = rows[0]["val"]
    pairs = [reports.paired_row(f"{reference}, PyTorch", base, f"{r['model']}, {r['runtime']}", r["val"])
             for r in rows[1:] if r["runtime"] != "PyTorch channels_last"]
    if pairs:
        print(f"\nagainst {reference} in PyTorch, on the same {base.n} validation images")
        print(reports.format_table(pairs, list(pairs[0])))
    fastest = {}
    for row in table:
        if row["model"] not in fastest or row["_ms"] < fastest[row["model"]]["_ms"]:
            fastest[row["model"]] = row
    print(f"\neach model in its fastest runtime at batch 1: speed against {reference} in PyTorch eager, "
          f"{cfg.threads} threads; accuracy on the {base.n} validation images")
    print(reports.markdown_table(list(fastest.values()), ["model", "runtime", "ms @1", "speed @1", f"speed @{batch}",
                                                          "file bytes", reports.VAL_COLUMN]))


if __name__ == "__main__":
    run(main)
