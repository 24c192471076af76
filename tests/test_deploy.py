"""05_deploy.py and predict.py: an ONNX file that predicts what the decoded model predicts, a
predictor that runs without PyTorch, and bad input as one line."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import HANG, REPO, load_script, run_script
from support import deploy, qfile

deploy_script = load_script("05_deploy.py")


@pytest.fixture(scope="module")
def deployed(pipeline, tmp_path_factory):
    ck, _, args = pipeline
    work = tmp_path_factory.mktemp("deploy") / "ck"
    shutil.copytree(ck, work)
    keep = [a for a in args if a.startswith(("--data_dir", "--cache_dir"))]
    run = run_script("05_deploy.py", *keep, f"--ckpt_dir={work}", "--repeats=2", "--batch_size=8")
    assert run.returncode == 0, run.stderr
    return work, run, keep


def test_every_model_is_exported_checked_and_timed(deployed):
    ck, run, _ = deployed
    for name in ("student_kd", "student_pruned", "final"):
        for suffix in (".onnx", ".int8.onnx"):
            assert (ck / f"{name}{suffix}").is_file()
        for runtime in ("PyTorch eager", "PyTorch channels_last", "ONNX Runtime fp32", "ONNX Runtime int8"):
            assert f"{name.ljust(14)}  {runtime}" in run.stdout
    assert "speed @8" in run.stdout and "agrees with PyTorch" in run.stdout
    ending = run.stdout.rsplit("\nwrote ", 1)[0].splitlines()  # the run ends with each model in its fastest runtime
    assert ending[-5].startswith("| model | runtime | ms @1 | speed @1 | speed @8 | file bytes | val acc")
    assert [line.split(" | ")[0] for line in ending[-3:]] == ["| student_kd", "| student_pruned", "| final"]
    records = {r["model"]: r for r in json.loads((ck / "results.json").read_text())}
    final = records["final"]["file"]
    assert records["final.onnx"]["source"] == final and records["final.onnx"]["agreement"] >= 0.995
    meta = deploy.metadata(deploy.session(ck / "final.onnx"), "final.onnx")
    assert meta["img_size"] == 16 and meta["resize"] == 18 and len(meta["classes"]) == 11


def test_the_onnx_file_computes_what_the_decoded_model_computes(deployed):
    ck, _, _ = deployed
    final = json.loads((ck / "results.json").read_text())
    final = next(r for r in final if r["model"] == "final")["file"]
    model, preprocess, _ = common.load_model(ck / final)
    crops = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.eval()(common.normalize(common.to_float(crops), preprocess["norm"])).numpy()
    got = deploy.logits(deploy.session(ck / "final.onnx"), [crops.numpy()])
    assert np.allclose(got, expected, atol=1e-4)


def no_torch_env(tmp_path):
    """An environment in which `import torch` fails."""
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("raise ImportError('no PyTorch in this process')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "shim")}


def predict(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], capture_output=True, text=True,
                          env=no_torch_env(tmp_path), cwd=tmp_path, timeout=HANG)


def test_predict_runs_without_pytorch_and_writes_what_04_wrote(deployed, tmp_path):
    ck, _, keep = deployed
    check = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(tmp_path), capture_output=True)
    assert check.returncode != 0
    testing = next(a.split("=", 1)[1] for a in keep if a.startswith("--data_dir")) + "/testing"
    run = predict(tmp_path, f"--model={ck / 'final.onnx'}", f"--folder={testing}", "--out=p.csv")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "p.csv").read_text() == (ck / "predictions.csv").read_text()
    run = predict(tmp_path, f"--model={ck / 'final.int8.onnx'}", f"--folder={testing}", "--out=q.csv")
    assert run.returncode == 0, run.stderr  # the quantizer adds metadata of its own
    assert len((tmp_path / "q.csv").read_text().splitlines()) == len((tmp_path / "p.csv").read_text().splitlines())


def test_int8_is_calibrated_on_every_class():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 4, 4, 3)
    crops = deploy_script.calibration_crops(images, 5, 2)
    assert crops.shape == (5, 2, 2, 3) and crops[:, 0, 0, 0].tolist() == [0, 24, 49, 74, 99]


def test_an_unreadable_image_is_a_warning_and_a_row_without_an_answer(deployed, tmp_path):
    ck, _, keep = deployed
    folder = tmp_path / "images"
    shutil.copytree(next(a.split("=", 1)[1] for a in keep if a.startswith("--data_dir")) + "/testing", folder)
    (folder / "0100.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    run = predict(tmp_path, f"--model={ck / 'final.onnx'}", f"--folder={folder}", "--out=p.csv")
    assert run.returncode == 0, run.stderr
    assert "0100.jpg: not a readable image" in run.stderr
    assert "; 1 unreadable, no answer; skipped 1 file(s) not .jpg/.jpeg/.png" in run.stdout
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == len(list(folder.iterdir())) and rows[0] == "Id,Category" and "100," in rows


def test_files_not_named_by_number_keep_their_names_and_the_classes_can_be_named(deployed, tmp_path):
    ck, _, keep = deployed
    testing = next(a.split("=", 1)[1] for a in keep if a.startswith("--data_dir")) + "/testing"
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("0000.jpg", "0001.jpg"):
        shutil.copy(f"{testing}/{name}", folder / f"dinner {name}")
    run = predict(tmp_path, f"--model={ck / 'final.onnx'}", f"--folder={folder}", "--out=p.csv", "--class_names=True")
    assert run.returncode == 0, run.stderr
    classes = deploy.metadata(deploy.session(ck / "final.onnx"), "final.onnx")["classes"]
    expected = {int(r.split(",")[0]): int(r.split(",")[1]) for r in (ck / "predictions.csv").read_text().splitlines()[1:]}
    assert (tmp_path / "p.csv").read_text().splitlines() == ["File,Category,Name"] + [
        f"dinner {n:04d}.jpg,{expected[n]},{classes[expected[n]]}" for n in (0, 1)]


def test_a_missing_model_names_the_one_05_wrote_and_a_folder_is_said_of_predict(deployed, tmp_path):
    """After the main command on the sample: checkpoints/final.onnx: not found, where 05 had written
    checkpoints/sample/final.onnx; a file as the folder was a 'split folder missing'."""
    ck, _, keep = deployed
    (tmp_path / "checkpoints" / "sample").mkdir(parents=True)
    shutil.copy(ck / "final.onnx", tmp_path / "checkpoints" / "sample")
    testing = next(a.split("=", 1)[1] for a in keep if a.startswith("--data_dir")) + "/testing"
    run = predict(tmp_path, "--model=checkpoints/final.onnx", f"--folder={testing}")
    assert run.returncode == 2 and run.stderr == ("error: checkpoints/final.onnx: not found; 05_deploy.py wrote "
                                                  "checkpoints/sample/final.onnx: give --model=checkpoints/sample/final.onnx\n")
    (tmp_path / "empty").mkdir()
    for folder, says in [(ck / "final.onnx", "a file, not a folder of images"),
                         (tmp_path / "empty", "no .jpg/.jpeg/.png images in this folder")]:
        run = predict(tmp_path, "--model=checkpoints/sample/final.onnx", f"--folder={folder}")
        assert run.returncode == 2 and run.stderr == f"error: {folder}: {says}\n"
    if not (REPO / "data" / "food-11").is_dir():  # the main command's run was the sample's: so is predict's
        shutil.copytree(testing, tmp_path / "data" / "sample" / "testing")
        run = predict(tmp_path)
        assert run.returncode == 0, run.stderr
        assert "wrote predictions.csv: 13 images of data/sample/testing classified by final.onnx" in run.stdout


def test_bad_model_files_are_one_line(deployed, tmp_path):
    ck, _, keep = deployed
    testing = next(a.split("=", 1)[1] for a in keep if a.startswith("--data_dir")) + "/testing"
    (tmp_path / "damaged.onnx").write_bytes((ck / "final.onnx").read_bytes()[:300])
    (tmp_path / "plain.onnx").write_bytes(deploy.onnx_bytes(common.StudentNet(num_classes=3), torch.zeros(1, 3, 16, 16)))
    for model, says in [("missing.onnx", "not found"), ("damaged.onnx", "not an ONNX model"),
                        (str(ck / "student_kd.pt"), "not an ONNX model"), ("plain.onnx", "without our preprocessing")]:
        run = predict(tmp_path, f"--model={model}", f"--folder={testing}")
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, (model, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1
    run = predict(tmp_path, f"--model={ck / 'final.onnx'}", f"--folder={tmp_path / 'nowhere'}")
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_05_refuses_what_it_cannot_deploy(deployed, tmp_path):
    ck, _, keep = deployed
    for models, says in [("student_nothing", "not found"), ("student_kd.onnx", "05 deploys our checkpoints"),
                         ("student_kd,student_kd.pt", "the same .onnx file")]:
        run = run_script("05_deploy.py", *keep, f"--ckpt_dir={ck}", f"--models={models}")
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
    empty = tmp_path / "ck"
    empty.mkdir()
    shutil.copy(ck / "student_kd.pt", empty)
    run = run_script("05_deploy.py", *keep, f"--ckpt_dir={empty}", "--models=student_kd,final")
    assert run.returncode == 2 and "no final file recorded" in run.stderr


@pytest.mark.parametrize("variant", ["q8", "q3c", "mix3", "fp16"])
def test_a_quantized_file_goes_into_the_onnx_file_as_its_codes(tmp_path, variant):
    """The .onnx file of a quantized file holds its codes (or float16 weights), not float32 ones: it computes what the
    decoded model computes (BatchNorm fused by the runtime), in a fraction of the float file's bytes."""
    model = common.StudentNet(widths=[16, 32, 64, 64, 64, 64, 64, 64], num_classes=3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # folding must matter
        torch.nn.init.uniform_(bn.weight, 0.5, 2.0), torch.nn.init.uniform_(bn.bias, -1, 1)
    model = responsive(model, "imagenet", 16)
    path = tmp_path / f"m.{variant}.npz"
    qfile.save_quantized(path, load_script("04_quantize.py").encode(model.state_dict(), variant),
                         common.arch_of(model), {"img_size": 16})
    decoded = common.load_model(path)[0].eval()
    codes = qfile.read_held(path)
    assert all(isinstance(c, np.ndarray) for c in codes.values()) == (variant == "fp16")
    module, example = deploy_script.Deployed(decoded, "imagenet"), torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    plain = deploy.onnx_bytes(module, example)
    blob = deploy.with_codes(deploy.onnx_bytes(module, example, by_name=True),
                             {f"model.{k}": c for k, c in codes.items()})
    crops = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(crops).numpy()
    assert np.ptp(expected, 0).max() > 1e-2  # the logits depend on the crop: a wrong input scale would show
    for onnx_model in (blob, plain):
        assert np.allclose(deploy.logits(deploy.session(onnx_model), [crops.numpy()]), expected, atol=1e-4)
    assert len(blob) < len(plain) / {"fp16": 1.7, "q8": 2}.get(variant, 3), (len(blob), len(plain))
    with pytest.raises(ValueError, match="no initializer 'model.nothing'"):
        deploy.with_codes(plain, {"model.nothing": next(iter(codes.values()))})


@pytest.mark.parametrize("norm", ["imagenet", "none"])
def test_the_deployed_module_is_the_model_on_uint8_crops(norm):
    model = responsive(common.StudentNet(num_classes=4), norm, 32)
    crops = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(common.normalize(common.to_float(crops), norm))
        assert (expected.max(0).values - expected.min(0).values).max() > 1e-2  # the logits depend on the crop
        for channels_last in (False, True):
            assert torch.allclose(deploy_script.Deployed(model, norm, channels_last)(crops), expected, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())  # Deployed changed a copy's layout, not the model's


@pytest.mark.parametrize("norm, before", [("imagenet", ["Transpose", "Cast", "Sub"]), ("none", ["Transpose", "Cast"])])
def test_the_deployed_graph_scales_the_input_in_the_first_convolution(norm, before):
    """Nothing but the layout, the cast and the mean touches the full-size input before the first
    convolution (its scale is in that convolution's weights): each pass there costs 2-4% of
    student_kd's time in ONNX Runtime."""
    import onnx
    blob = deploy.onnx_bytes(deploy_script.Deployed(common.StudentNet(num_classes=4), norm),
                             torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    ops = [n.op_type for n in onnx.load_from_string(blob).graph.node if n.op_type != "Constant"]
    assert ops[:ops.index("Conv")] == before


def responsive(model, norm, size):
    """`model` in eval mode with BatchNorm statistics of random images normalised by `norm`: with
    the initial statistics a random StudentNet's logits barely depend on its input (1e-6), so a
    comparison of logits would pass whatever the input's scale."""
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        model(common.normalize(torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(1)), norm))
    return model.eval()


class ScaledInput(torch.nn.Module):
    """x * s (per channel) into a convolution, in the ways a graph can hold one."""

    def __init__(self, case):
        super().__init__()
        self.case, self.s = case, torch.tensor([0.5, 2.0, -1.0, 3.0]).view(1, 4, 1, 1)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4 if case == "grouped" else 1)

    def forward(self, x):
        y = (x[:, :1] if self.case == "broadcast" else x) * self.s
        out = self.conv(y)
        if self.case == "second reader":
            return out + y.mean()
        if self.case == "graph output":
            return out, y
        if self.case == "shared weights":
            return out + torch.nn.functional.conv2d(x * self.s.flip(1), self.conv.weight, padding=1)
        return out


@pytest.mark.parametrize("case, moved", [("plain", True), ("shared weights", True), ("grouped", False),
                                         ("second reader", False), ("graph output", False), ("broadcast", False)])
def test_a_scale_moves_into_the_convolution_only_where_that_is_exact(case, moved):
    import onnx
    torch.manual_seed(0)
    module, x = ScaledInput(case).eval(), torch.rand(2, 4, 6, 6)
    for by_name in (False, True):
        blob = deploy.onnx_bytes(module, x, by_name=by_name)
        graph = onnx.load_from_string(blob).graph
        scaled = {n.output[0] for n in graph.node if n.op_type == "Mul"}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        assert all(c.input[0] not in scaled for c in convs) == moved
        if by_name:
            deploy.image_input_only(graph)
            blob = graph_bytes(graph)
        with torch.no_grad():
            expected = module(x)
        got = deploy.session(blob).run(None, {deploy.INPUT: x.numpy()})[0]
        assert np.allclose(got, (expected[0] if case == "graph output" else expected).numpy(), atol=1e-5)


def graph_bytes(graph):
    import onnx
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]).SerializeToString()


def test_timing_interleaves_and_lets_the_last_runtime_go_idle():
    log = []  # (runner, start, end) of every call

    def runner(name):
        def run():
            start = time.perf_counter()
            log.append((name, start, time.perf_counter()))
        return run
    times = deploy.interleaved_times({"a": runner("a"), "b": runner("b")}, repeats=3, calls=2, pause=0.02)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert [name for name, _, _ in log] == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    for i in range(3, len(log), 3):  # each runner's block (an untimed call, then `calls`) after a pause
        assert log[i][1] - log[i - 1][2] >= 0.02
