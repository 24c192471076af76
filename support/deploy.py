"""Deployment: a model exported to ONNX with its preprocessing in the file's metadata, run by
ONNX Runtime on pinned threads; a static int8 version (QDQ, per channel) calibrated on training
images; and timing, interleaved, so that a slow spell of the machine hits every runner alike.
Needs no PyTorch except to export: predict.py runs a deployed file with numpy and OpenCV."""
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from support import files
from support.running import UserError

INPUT, OUTPUT = "image", "logits"


def onnx_bytes(module, example, metadata=None):
    """`module` (eval mode, on the CPU) as an fp32 ONNX model with a batch axis of any size, its
    input shaped like `example`; `metadata` (JSON-able values) goes into its metadata_props.
    The TorchScript exporter: it folds BatchNorm into the convolutions and needs no onnxscript."""
    import onnx
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), (example,), buf, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return proto.SerializeToString()


def session(model, threads=1):
    """An ONNX Runtime session on the CPU (`model`: a path or the bytes of one), `threads`
    threads per operator, one operator at a time."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal the next timing's CPU
    if isinstance(model, bytes):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    if not Path(model).is_file():
        raise UserError(f"{model}: not found; 05_deploy.py writes the .onnx files")
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...) for a bad file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:150]
        raise UserError(f"{model}: not an ONNX model ONNX Runtime can run ({reason})") from None


PREPROCESS_KEYS = ("img_size", "resize", "classes")


def metadata(sess, path):
    """What a file 05_deploy.py wrote records: img_size, resize and the class names (other
    entries, such as the one onnxruntime's quantizer adds, are left alone); checked."""
    meta = {}
    for key, value in sess.get_modelmeta().custom_metadata_map.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            pass
    missing = [k for k in PREPROCESS_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: an ONNX model without our preprocessing ({', '.join(missing)} missing); "
                        "deploy it with 05_deploy.py")
    size, resize, inputs = meta["img_size"], meta["resize"], sess.get_inputs()
    if not (isinstance(size, int) and size >= 1 and isinstance(resize, int) and (resize == -1 or resize >= size)
            and len(inputs) == 1 and inputs[0].type == "tensor(uint8)"):
        raise UserError(f"{path}: its metadata (img_size={size!r}, resize={resize!r}) or its input "
                        f"({inputs[0].type if inputs else 'none'}) is not what 05_deploy.py writes")
    return meta


def logits(sess, batches):
    """Logits for an iterable of input batches (numpy arrays as the model takes them)."""
    return np.concatenate([sess.run([OUTPUT], {INPUT: x})[0] for x in batches])


def quantize_int8(fp32_path, int8_path, calibration):
    """A static int8 version of an ONNX file (QDQ: int8 weights per output channel, uint8
    activations) whose activation ranges are calibrated on `calibration`, a list of input batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT: x}

    tmp = Path(int8_path).with_name(f".{Path(int8_path).name}.quant")
    try:
        with warnings.catch_warnings():  # and its logging's advice to pre-process: our graphs are plain
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        files.atomic_write(int8_path, lambda f: f.write(tmp.read_bytes()))
    finally:
        logging.disable(logging.NOTSET)
        tmp.unlink(missing_ok=True)


def interleaved_times(runners, repeats, calls=1, pause=0.05):
    """{name: [seconds per call, one per round]}: every round runs each runner `calls` times, in
    turn, so a slow spell of the machine hits them alike. Each turn starts `pause` seconds after
    the one before, with one untimed call: idle threads of the runtime that just ran (PyTorch's
    OpenMP threads spin after their work) must not take the next one's cores, and its own
    threads are awake when the clock starts."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            time.sleep(pause)
            run()
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def onnx_latency_ms(models, img_size, batch=64, repeats=7, threads=2):
    """{name: median milliseconds} of each float model (N x 3 x S x S input) in ONNX Runtime
    fp32 at `batch`, timed interleaved."""
    import torch
    example = torch.zeros(1, 3, img_size, img_size)
    x = np.random.default_rng(0).random((batch, 3, img_size, img_size), dtype=np.float32)
    runners = {}
    for name, model in models.items():
        sess = session(onnx_bytes(model.float(), example), threads)
        runners[name] = lambda sess=sess: sess.run([OUTPUT], {INPUT: x})
    return {name: 1000 * float(np.median(t)) for name, t in interleaved_times(runners, repeats).items()}
