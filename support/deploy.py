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


def onnx_bytes(module, example, metadata=None, by_name=False):
    """`module` (eval mode, on the CPU) as an fp32 ONNX model with a batch axis of any size, its
    input shaped like `example`; `metadata` (JSON-able values) goes into its metadata_props.
    The TorchScript exporter (it needs no onnxscript): it folds BatchNorm into the convolutions.
    by_name (for with_codes): every parameter stays an initializer of its own name, none folded
    or merged with an equal one; ONNX Runtime fuses the BatchNorms when a session starts."""
    import onnx
    import torch
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.PRESERVE if by_name else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), (example,), buf, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17, dynamo=False,
                          training=mode, keep_initializers_as_inputs=by_name)
    proto = onnx.load_from_string(buf.getvalue())
    scale_into_conv(proto)
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return proto.SerializeToString()


def scale_into_conv(proto):
    """A per-channel scale of a convolution's input (a Mul by a constant 1 x C x 1 x 1 of an input
    that already has C channels, read by one ungrouped Conv and nothing else) moved into the
    convolution's weights: conv(x * s, W) = conv(x, W * s) with W's input channels scaled, and the
    padding's zeros stay zeros. Deployed's normalisation ends in such a Mul, one of the passes over
    the full-size input that each cost 2-4% of student_kd's time in ONNX Runtime. Weights held as
    an initializer are scaled here; weights fed by name (by_name: with_codes may replace them by
    nodes) get a Mul of their own, which ONNX Runtime folds when a session starts."""
    import onnx
    from onnx import helper, numpy_helper
    graph = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.input, *inferred.value_info]}
    inits = {i.name: i for i in graph.initializer}
    made = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}
    readers = {o.name: [o] for o in graph.output}  # a graph output is a reader too
    for n in graph.node:
        for v in n.input:
            readers.setdefault(v, []).append(n)
    fed = {i.name for i in graph.input}
    for mul in [n for n in graph.node if n.op_type == "Mul"]:
        x, s = mul.input if mul.input[1] in inits or mul.input[1] in made else reversed(mul.input)
        if s not in inits and s not in made:
            continue
        scale = numpy_helper.to_array(inits[s] if s in inits else made[s].attribute[0].t)
        conv = readers.get(mul.output[0], [])
        if (len(conv) != 1 or getattr(conv[0], "op_type", None) != "Conv" or list(conv[0].input[:1]) != [mul.output[0]]
                or scale.ndim != 4 or scale.shape[:1] + scale.shape[2:] != (1, 1, 1)
                or len(shapes.get(x, [])) != 4 or shapes[x][1] != scale.shape[1]
                or any(a.name == "group" and a.i != 1 for a in conv[0].attribute)):
            continue
        conv, w = conv[0], conv[0].input[1]
        conv.input[0] = x
        graph.node.remove(mul)
        if w in inits and w not in fed and len(readers[w]) == 1:
            weight = numpy_helper.to_array(inits[w])
            inits[w].CopyFrom(numpy_helper.from_array(weight * scale.astype(weight.dtype), w))
            if len(readers[s]) == 1:  # nothing else reads the scale
                if s in made:
                    graph.node.remove(made[s])
                else:
                    graph.initializer.remove(inits[s])
        else:
            scaled = f"{mul.output[0]}.weight"  # the Mul's own output name is free now, and unique
            graph.node.insert(list(graph.node).index(conv), helper.make_node("Mul", [w, s], [scaled]))
            conv.input[1] = scaled


def with_codes(blob, codes):
    """The ONNX model `blob` (from onnx_bytes(..., by_name=True)) with each float initializer
    named in `codes` ({name: qfile.Codes or a float16 array}) rebuilt from what a quantized file
    holds by graph nodes: the codes of each width bit-packed into one byte string, unpacked,
    split, and each row scaled into its [lo, hi]; a float16 array cast. The nodes depend on
    nothing but constants, so ONNX Runtime folds them into float weights when a session starts
    (the default optimization level; a runtime that folds nothing would decode them on every
    call): a 3-bit file's is a sixth of a float one, a float16 file's half, and each runs as fast."""
    import onnx
    proto = onnx.load_from_string(blob)
    graph = proto.graph
    floats = {i.name: i for i in graph.initializer}
    missing = sorted(set(codes) - set(floats))
    if missing:
        raise ValueError(f"the graph has no initializer {missing[0]!r}")
    decoder = Decoder(graph)
    for name, held in codes.items():
        if isinstance(held, np.ndarray):
            decoder.node("Cast", [decoder.const(held.astype(np.float16))], [name], to=onnx.TensorProto.FLOAT)
            graph.initializer.remove(floats[name])
    codes = {name: c for name, c in codes.items() if not isinstance(c, np.ndarray)}
    for bits in sorted({c.bits for c in codes.values()}):
        group = {name: c for name, c in codes.items() if c.bits == bits}
        parts = decoder.codes(np.concatenate([c.q.reshape(-1) for c in group.values()]), bits,
                              [c.q.size for c in group.values()])
        for part, (name, c) in zip(parts, group.items()):
            decoder.weight(part, c, list(floats[name].dims), name)
            graph.initializer.remove(floats[name])
    image_input_only(graph)
    short_names(graph)
    exported = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoder.nodes + exported)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


class Decoder:
    """The nodes with_codes adds, and their constants (each distinct array stored once)."""

    def __init__(self, graph):
        self.graph, self.nodes, self.consts, self.ids = graph, [], {}, iter(range(1 << 30))

    def const(self, array):
        from onnx import numpy_helper
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            self.consts[key] = f"k{next(self.ids)}"
            self.graph.initializer.append(numpy_helper.from_array(array, self.consts[key]))
        return self.consts[key]

    def node(self, op, inputs, outputs=None, **attrs):
        from onnx import helper
        outputs = outputs or [f"u{next(self.ids)}"]
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def codes(self, q, bits, sizes):
        """Codes q (uint8, each < 2^bits) as float vectors of the given sizes, from q bit-packed."""
        from onnx import TensorProto

        from support import qfile  # here: it imports PyTorch, which predict.py must not need
        packed = self.const(qfile.pack_bits(q, bits))
        if bits == 8:
            values = self.node("Cast", [packed], to=TensorProto.FLOAT)
        else:  # each byte -> its 8 bits, MSB first -> the first len(q) * bits -> rows of bits -> codes
            byte = self.node("Unsqueeze", [self.node("Cast", [packed], to=TensorProto.INT32), self.shape([1])])
            shifted = self.node("Div", [byte, self.const(np.int32(1) << np.arange(7, -1, -1, dtype=np.int32))])
            bit = self.node("Reshape", [self.node("Mod", [shifted, self.const(np.int32(2))]), self.shape([-1])])
            used = self.node("Slice", [bit, self.shape([0]), self.shape([len(q) * bits])])
            rows = self.node("Reshape", [used, self.shape([len(q), bits])])
            weights = np.float32(2) ** np.arange(bits - 1, -1, -1, dtype=np.float32)
            values = self.node("MatMul", [self.node("Cast", [rows], to=TensorProto.FLOAT), self.const(weights)])
        if len(sizes) == 1:
            return [values]
        return self.node("Split", [values, self.shape(sizes)], [f"u{next(self.ids)}" for _ in sizes])

    def weight(self, part, c, dims, name):
        """The node that makes `name` (shape dims) from its codes: lo + code * (hi - lo) / (2^bits - 1)
        per row, as qfile.dequantize does; a range per row kept as the file stores it (float16)."""
        from onnx import TensorProto
        if len(c.lo) == 1:  # one range: float32 scalars, and a vector needs no reshaping
            lo = self.const(np.float32(c.lo[0]))
            step = self.const(np.float32((np.float64(c.hi[0]) - np.float64(c.lo[0])) / (2 ** c.bits - 1)))
        else:
            part = self.node("Reshape", [part, self.shape(c.q.shape)])
            lo, hi = (self.node("Cast", [self.const(a.reshape(-1, 1))], to=TensorProto.FLOAT) for a in (c.lo, c.hi))
            step = self.node("Div", [self.node("Sub", [hi, lo]), self.const(np.float32(2 ** c.bits - 1))])
        flat = len(dims) == 1 and len(c.lo) == 1  # already the tensor's shape
        value = self.node("Add", [self.node("Mul", [part, step]), lo], [name] if flat else None)
        return value if flat else self.node("Reshape", [value, self.shape(dims)], [name])

    def shape(self, dims):
        return self.const(np.asarray(dims, dtype=np.int64))


def image_input_only(graph):
    """Only the image stays a graph input: an initializer that is also an input may be fed at
    run time, so the runtime cannot fold what depends on it."""
    kept = [i for i in graph.input if i.name == INPUT]
    del graph.input[:]
    graph.input.extend(kept)


def short_names(graph):
    """No node names, and short names for the values the nodes make (the exporter's, such as
    /model/cnn/cnn.1/cnn.1.2/Clip_output_0, would take a fifth of a quantized model's file)."""
    rename = {v: f"t{i}" for i, v in enumerate(dict.fromkeys(o for n in graph.node for o in n.output))
              if v not in (INPUT, OUTPUT)}
    for n in graph.node:
        n.name = ""
        n.input[:] = [rename.get(v, v) for v in n.input]
        n.output[:] = [rename.get(v, v) for v in n.output]
    del graph.value_info[:]


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


def quantize_int8(fp32, int8_path, calibration):
    """A static int8 version of an fp32 ONNX model (its bytes; QDQ: int8 weights per output
    channel, uint8 activations) whose activation ranges are calibrated on `calibration`, a list
    of input batches."""
    import onnx
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
            quantize_static(onnx.load_from_string(fp32), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
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
