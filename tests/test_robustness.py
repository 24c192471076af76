"""Bad input, interrupted runs, safe loading: what a typo, a stray file or Ctrl-C costs (nothing)."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import common
from support import files, running
from conftest import FAST, HANG, REPO, run_script, snapshot, start, wait_for


def assert_clean_error(proc, message, code=2):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture
def workspace(sample_root, tmp_path):
    """A copy of the tiny data set and a checkpoint folder that already holds files."""
    root = tmp_path / "food"
    shutil.copytree(sample_root, root)
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(common.make_teacher(11).state_dict(), ck / "teacher_resnet18.bin")
    common.save_checkpoint(ck / "student_scratch.pt", common.StudentNet(), {"norm": "imagenet"})
    return root, ck


def args_for(root, ck, tmp_path):
    return [f"--data_dir={root}", f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}", *FAST]


BAD_DATA = {
    "root missing": (lambda r: shutil.rmtree(r), "data folder not found"),
    "split missing": (lambda r: shutil.rmtree(r / "validation"), "split folder missing"),
    "split empty": (lambda r: [p.unlink() for p in (r / "training").iterdir()], "no .jpg/.jpeg/.png"),
    "bad label": (lambda r: (r / "training" / "0_0.jpg").rename(r / "training" / "rice.jpg"),
                  "integer class"),
    "label outside classes.txt": (lambda r: (r / "classes.txt").write_text("a\nb\nc\n"),
                                  "outside classes.txt"),
    "all unreadable": (lambda r: [p.write_bytes(b"") for p in (r / "validation").iterdir()],
                       "no readable image left"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_with_one_line(workspace, tmp_path, case):
    root, ck = workspace
    before = snapshot(ck)
    break_it, message = BAD_DATA[case]
    break_it(root)
    proc = run_script("02_distill.py", *args_for(root, ck, tmp_path))
    assert_clean_error(proc, message)
    assert snapshot(ck) == before


def test_unreadable_files_are_skipped_with_one_warning_each(workspace, tmp_path):
    root, ck = workspace
    (root / "training" / "0_100.jpg").write_bytes(b"")
    (root / "training" / "0_101.png").write_bytes(b"\x89PNG not really")
    good = (root / "training" / "1_0.jpg").read_bytes()
    (root / "training" / "1_102.jpg").write_bytes(good[:100])
    proc = run_script("01_architecture.py", *args_for(root, ck, tmp_path), "--epochs=1", "--bench=False")
    assert proc.returncode == 0, proc.stderr
    for name in ("0_100.jpg", "0_101.png", "1_102.jpg"):
        assert proc.stderr.count(name) == 1


def bad_teacher(ck, kind):
    path = ck / "teacher_resnet18.bin"
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "student":
        torch.save(common.StudentNet().state_dict(), path)
    elif kind == "classes":
        torch.save(common.make_teacher(10).state_dict(), path)
    elif kind == "pickle":
        torch.save({"conv1.weight": torch.zeros(1), "evil": os.system}, path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found; run 00_teacher.py first"),
    ("truncated", "damaged or not a PyTorch file"),
    ("student", "holds a StudentNet (widths [16, 32, 64, 128, 256, 256, 256, 256]) with 11 classes, "
                "but a ResNet18 with 11 classes is needed"),
    ("classes", "holds a ResNet18 with 10 classes, but a ResNet18 with 11 classes"),
    ("pickle", "refused, it holds Python objects beyond weights"),
])
def test_bad_input_checkpoints(workspace, tmp_path, kind, message):
    root, ck = workspace
    bad_teacher(ck, kind)
    before = snapshot(ck)
    assert_clean_error(run_script("02_distill.py", *args_for(root, ck, tmp_path)), message)
    assert snapshot(ck) == before


def test_missing_student_kd_says_which_script_makes_it(workspace, tmp_path):
    root, ck = workspace
    for script in ("03_prune.py", "04_quantize.py"):
        assert_clean_error(run_script(script, *args_for(root, ck, tmp_path)),
                           "student_kd.pt: not found; run 02_distill.py first")


@pytest.mark.parametrize("script, arg, message", [
    ("01_architecture.py", "--epochz=3", "unknown setting --epochz"),
    ("01_architecture.py", "--epochs=1.5", "--epochs takes a whole number"),
    ("01_architecture.py", "--epochs=0", "--epochs=0 is out of range"),
    ("01_architecture.py", "--batch_size=0", "--batch_size=0 is out of range"),
    ("02_distill.py", "--lr=0", "--lr=0.0 is out of range"),
    ("03_prune.py", "--prune_rate=1.5", "--prune_rate=1.5 is out of range: it must be in (0, 1)"),
    ("02_distill.py", "--temperature=0", "--temperature=0.0 is out of range"),
    ("02_distill.py", "--alpha=2", "--alpha=2.0 is out of range"),
    ("03_prune.py", "--method=best", "--method=best is out of range: it must be uniform or global"),
    ("04_quantize.py", "--variants=q8,q9", "--variants='q8,q9': give a comma-separated list of fp16, qN, qNc or mixN"),
    ("04_quantize.py", "--models=,", "--models=',': give a comma-separated list"),
    ("04_quantize.py", "--max_bytes=-1", "--max_bytes=-1 is out of range: it must be at least 0 (0 = no budget)"),
])
def test_bad_settings(workspace, tmp_path, script, arg, message):
    root, ck = workspace
    before = snapshot(ck)
    assert_clean_error(run_script(script, *args_for(root, ck, tmp_path), arg), message)
    assert snapshot(ck) == before


def test_an_unwritable_checkpoint_folder_fails_before_training(workspace, tmp_path):
    root, _ = workspace
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc = run_script("01_architecture.py", *args_for(root, blocker / "ck", tmp_path))
    assert_clean_error(proc, "cannot write checkpoints here")
    assert "training" not in proc.stdout


# --- interrupted runs, NaN, determinism -----------------------------------------------------

def train_args(root, ck, tmp_path, epochs=4):
    return [f"--data_dir={root}", f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}", *FAST,
            f"--epochs={epochs}", "--bench=False"]


def tensors(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(sample_root, tmp_path_factory):
    """Two uninterrupted runs with the same seed."""
    out = []
    for i in range(2):
        tmp = tmp_path_factory.mktemp(f"ref{i}")
        proc = run_script("01_architecture.py", *train_args(sample_root, tmp / "ck", tmp))
        assert proc.returncode == 0, proc.stderr
        out.append((tmp / "ck", proc.stdout))
    return out


def test_same_seed_gives_identical_accuracies_and_tensors(reference):
    (ck1, out1), (ck2, out2) = reference
    acc = lambda out: re.findall(r"select loss \S+ acc \S+", out)
    assert acc(out1) == acc(out2) and len(acc(out1)) == 4
    a, b = tensors(ck1 / "student_scratch.pt"), tensors(ck2 / "student_scratch.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(reference, sample_root, tmp_path):
    ck = tmp_path / "ck"
    args = train_args(sample_root, ck, tmp_path)
    proc = start("01_architecture.py", args)
    wait_for(ck / "student_scratch.pt.resume.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script("01_architecture.py", *args, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming scratch" in resumed.stdout
    a, b = tensors(reference[0][0] / "student_scratch.pt"), tensors(ck / "student_scratch.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (ck / "student_scratch.pt.resume.pt").exists()
    assert not list(ck.glob(".*tmp*"))


def test_ctrl_c_exits_130_and_says_where_the_state_is(sample_root, tmp_path):
    ck = tmp_path / "ck"
    proc = start("01_architecture.py", train_args(sample_root, ck, tmp_path, epochs=50))
    wait_for(ck / "student_scratch.pt.resume.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    common.load_model(ck / "student_scratch.pt.new")  # the best epoch so far is whole
    assert not (ck / "student_scratch.pt").exists()  # and not published: the run did not finish
    torch.load(ck / "student_scratch.pt.resume.pt", weights_only=True)


def test_a_nan_loss_stops_the_run_and_keeps_the_best_checkpoint(workspace, tmp_path):
    root, ck = workspace
    best = (ck / "student_scratch.pt").read_bytes()
    proc = run_script("01_architecture.py", *train_args(root, ck, tmp_path, epochs=2), "--lr=1e30")
    assert_clean_error(proc, "in epoch 1, step")
    assert "try a lower --lr" in proc.stderr
    assert (ck / "student_scratch.pt").read_bytes() == best


def test_a_resumable_state_of_another_run_is_a_clear_error(workspace, tmp_path):
    root, ck = workspace
    other = common.StudentNet(widths=[4] * 8, num_classes=11)
    torch.save({"model": other.state_dict(), "epoch": 1}, ck / "student_scratch.pt.resume.pt")
    proc = run_script("01_architecture.py", *train_args(root, ck, tmp_path, epochs=2), "--resume=True")
    assert_clean_error(proc, "not a resumable state of this version")


def test_rounds_that_round_to_the_same_keep_get_files_of_their_own(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    run = run_script("03_prune.py", *args, f"--ckpt_dir={work}", "--prune_rate=0.9995", "--prune_count=3",
                     "--finetune_epochs=0", "--max_loss_rise=1e9")
    assert run.returncode == 0, run.stderr
    assert {p.name for p in work.glob("student_pruned_0.99*")} == {
        f"student_pruned_{k}_global.pt" for k in ("0.9995", "0.9990", "0.9985")}


def test_publish_refuses_two_outputs_of_one_name_before_touching_anything(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"old")
    files.new_path(tmp_path / "a.pt").write_bytes(b"new")
    with pytest.raises(running.UserError, match="a.pt: two outputs of this run share the name"):
        files.publish(tmp_path, [tmp_path / "a.pt", tmp_path / "a.pt"])
    assert (tmp_path / "a.pt").read_bytes() == b"old" and not (tmp_path / files.RESULTS).exists()


def test_a_crop_larger_than_the_recorded_stored_size_brings_its_own(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    plain = [a for a in args if not a.startswith(("--img_size", "--resize", "--ckpt_dir"))]
    run = run_script("03_prune.py", *plain, f"--ckpt_dir={work}", "--img_size=40", "--prune_count=1",
                     "--finetune_epochs=0", "--max_loss_rise=1e9")  # student_kd.pt: 16 px crops stored at 18
    assert run.returncode == 0, run.stderr
    assert "(46 px stored, 40 px crops)" in run.stdout
    too_small = run_script("03_prune.py", *plain, f"--ckpt_dir={work}", "--img_size=40", "--resize=30")
    assert_clean_error(too_small, "resize=30 is smaller than the crop, img_size=40")


FAKED_TORCHVISION = """import importlib.metadata as m, runpy, sys
real = m.version
m.version = lambda name: {!r} if name == "torchvision" else real(name)
sys.argv = [sys.argv[1], "--epochs=0"]  # were the pair let through: a one-line error of another kind
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("torchvision", ["0.28.0", "0.29.1+cpu"])
def test_a_torchvision_of_another_torch_is_one_line_before_any_work(tmp_path, torchvision):
    """A torchvision built for another torch (or platform) died in its import: operator
    torchvision::nms does not exist."""
    proc = subprocess.run([sys.executable, "-c", FAKED_TORCHVISION.format(torchvision), "00_teacher.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=HANG)
    assert_clean_error(proc, f"with torchvision {torchvision}: ")
    assert proc.stderr.startswith("error: torch ") and len(proc.stderr.strip().splitlines()) == 1
    assert running.torch_pair_problem("2.4.1+cpu", "0.19.1+cpu") is None
    assert "torch 2.13 takes torchvision 0.28" in running.torch_pair_problem("2.13.0", "0.29.1")
    assert "(cpu, untagged)" in running.torch_pair_problem("2.13.0+cpu", "0.28.0")
    assert "(cu128, cu130)" in running.torch_pair_problem("2.14.1+cu128", "0.29.1+cu130")
    assert running.torch_pair_problem("2.5.0a0+e000cf0ad9", "0.20.0a0") is None  # a source build's git hash
    assert running.torch_pair_problem("2.14.1", "0.29.1+cu130") is None


def test_requirements_pin_torch_and_torchvision_as_a_pair():
    pins = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (REPO / "requirements.txt").read_text(), flags=re.M))
    assert set(pins) == {"torch", "torchvision"} and running.torch_pair_problem(pins["torch"], pins["torchvision"]) is None
