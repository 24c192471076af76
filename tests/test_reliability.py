"""Never lose a good model: outputs are replaced only by a finished run, Ctrl-C at any moment is
one line and exit 130, a resumed run is checked against what it resumes, and every setting and
input file is checked before any work."""
import os
import re
import shutil
import signal
import sys
import time

import matplotlib.container
import matplotlib.text
import pytest
import torch

import common
from support import files, images, plots, running, settings
from support.resume import Resumable
from conftest import FAST, HANG, load_script, overridden, run_script, snapshot, start, wait_for


def assert_untouched(before, folder):
    """Every file that was there is byte-identical; new ones are only work files."""
    after = snapshot(folder)
    assert {k: after.get(k) for k in before} == before
    assert all(name.endswith((".new", ".resume.pt")) for name in set(after) - set(before)), set(after) - set(before)
    assert not [n for n in after if ".tmp" in n]


def assert_one_line(stderr, start="interrupted"):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), stderr
    assert "Traceback" not in stderr


@pytest.fixture
def finished(pipeline, tmp_path):
    """A copy of a finished run's checkpoint folder, and the arguments that point at it."""
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    return work, [a for a in args if not a.startswith("--ckpt_dir")] + [f"--ckpt_dir={work}"]


# --- a run replaces its outputs only when it finishes -----------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_rerun_leaves_the_good_model_and_its_record(finished, sig):
    ck, args = finished
    before = snapshot(ck)
    proc = start("01_architecture.py", [*args, "--epochs=50", "--bench=False"])
    wait_for(ck / "student_scratch.pt.resume.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130
    assert "the previous outputs are as they were" in err
    assert_untouched(before, ck)
    assert common.load_model(ck / "student_scratch.pt.new")  # the new run's best epoch so far, whole


def test_a_failed_rerun_leaves_them_too(finished):
    ck, args = finished
    before = snapshot(ck)
    proc = run_script("02_distill.py", *args, "--epochs=2", "--lr=1e30")  # the settings of the pipeline's bank
    assert proc.returncode == 2 and "the loss became" in proc.stderr
    assert_untouched(before, ck)


def test_a_new_scratch_student_drops_the_rows_of_a_student_kd_started_from_it(finished):
    ck, args = finished
    assert run_script("02_distill.py", *args, "--epochs=1", "--from_scratch=False").returncode == 0
    assert {r["model"]: r for r in files.read_results(ck)}["student_kd"]["start"] == "student_scratch"
    assert run_script("01_architecture.py", *args, "--epochs=1", "--bench=False", "--mix=none").returncode == 0
    assert sorted(files.stage_of(r) for r in files.read_results(ck)) == ["0", "1"]


def test_a_finished_run_replaces_files_and_records_together(finished):
    ck, args = finished
    old = {r["model"]: r for r in files.read_results(ck)}["student_kd"]
    proc = run_script("02_distill.py", *args, "--epochs=1", "--seed=5")
    assert proc.returncode == 0, proc.stderr
    new = {r["model"]: r for r in files.read_results(ck)}["student_kd"]
    assert new["seed"] == 5 and old["seed"] == 0
    assert new["bytes"] == files.file_bytes(ck / "student_kd.pt")
    assert not list(ck.glob("*.new")) and not list(ck.glob("*.resume.pt"))
    assert f"wrote {ck / 'student_kd.pt'}, {ck / 'results.json'}" in proc.stdout


# --- Ctrl-C at any moment -------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.15, 0.6])
def test_ctrl_c_while_starting(tmp_path, delay):
    proc = start("02_distill.py", [f"--ckpt_dir={tmp_path}"])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, err
    assert_one_line(err)
    assert out == "" and list(tmp_path.iterdir()) == []


def interrupt_inside(monkeypatch, owner, name, midway=False):
    """Make `owner.name` deliver a real SIGINT to this process while it runs."""
    original = getattr(owner, name)

    sent = []

    def ctrl_c():  # once: a user presses Ctrl-C once
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
            time.sleep(0.5)  # the KeyboardInterrupt lands here, inside the call

    def interrupted(*args, **kw):
        ctrl_c()
        return original(*args, **kw)

    def interrupted_while_writing(path, write):
        def half_then_interrupt(f):
            f.write(b"half a file")
            ctrl_c()
            write(f)
        return original(path, half_then_interrupt)
    monkeypatch.setattr(owner, name, interrupted_while_writing if midway else interrupted)


MOMENTS = {
    "decoding": ("01_architecture.py", lambda m: (images, "decode_image"), ["--epochs=1", "--bench=False"]),
    "benchmark": ("01_architecture.py", lambda m: (m, "cpu_speed"), ["--epochs=1"]),
    "training": ("01_architecture.py", lambda m: (common, "train_epoch"), ["--epochs=1", "--bench=False"]),
    "evaluation": ("02_distill.py", lambda m: (common, "evaluate"), ["--epochs=1"]),
    "quantizing": ("04_quantize.py", lambda m: (m, "encode"), []),
    "writing": ("04_quantize.py", lambda m: (files, "atomic_write"), []),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_at_any_moment_is_one_line_and_loses_nothing(finished, monkeypatch, capsys, tmp_path, moment):
    ck, args = finished
    script, target, extra = MOMENTS[moment]
    module = load_script(script)
    interrupt_inside(monkeypatch, *target(module), midway=moment == "writing")
    monkeypatch.setattr(sys, "argv", [script, *overridden([*args, f"--cache_dir={tmp_path / 'fresh-cache'}", *extra])])
    before = snapshot(ck)
    with pytest.raises(SystemExit) as stop:
        running.run(module.main)
    assert stop.value.code == 130
    assert_one_line(capsys.readouterr().err)
    assert_untouched(before, ck)


# --- resume checks what it resumes ----------------------------------------------------------

def test_resume_uses_the_recorded_settings_or_refuses_other_given_ones(sample_root, tmp_path):
    ck = tmp_path / "ck"
    args = [f"--data_dir={sample_root}", f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}",
            *FAST, "--bench=False"]
    proc = start("01_architecture.py", [*args, "--epochs=3", "--mix=mixup"])
    wait_for(ck / "student_scratch.pt.resume.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for wrong, message in (("--epochs=5", "--epochs=5, but student_scratch.pt.resume.pt was made with epochs=3"),
                           ("--mix=cutmix", "--mix=cutmix, but student_scratch.pt.resume.pt was made with mix=mixup"),
                           ("--lr=0.1", "--lr=0.1, but student_scratch.pt.resume.pt was made with lr=0.003")):
        refused = run_script("01_architecture.py", *args, wrong, "--resume=True")
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert refused.stdout == "" and "Traceback" not in refused.stderr
    resumed = run_script("01_architecture.py", *args, "--resume=True")  # 01's default is 40 epochs
    assert resumed.returncode == 0, resumed.stderr
    assert "; epochs=3, mix=mixup from student_scratch.pt.resume.pt" in resumed.stdout  # the settings: line
    assert "scratch epoch   3/3" in resumed.stdout and "/40" not in resumed.stdout


def test_a_state_of_another_data_set_is_refused_before_training(sample_root, tmp_path):
    ck = tmp_path / "ck"
    args = [f"--data_dir={sample_root}", f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}",
            *FAST, "--bench=False", "--epochs=2"]
    proc = start("01_architecture.py", args)
    wait_for(ck / "student_scratch.pt.resume.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = tmp_path / "other"
    shutil.copytree(sample_root, other)
    (other / "training" / "0_0.jpg").unlink()
    refused = run_script("01_architecture.py", *args, f"--data_dir={other}", "--resume=True")
    assert refused.returncode == 2 and "was made on other training files" in refused.stderr, refused.stderr
    assert "scratch epoch" not in refused.stdout


# --- everything is checked before any work --------------------------------------------------

CHECKED_FIRST = [
    ("03_prune.py", ["--method=random"], "--method=random is out of range: it must be uniform or global"),
    ("02_distill.py", [], "teacher_resnet18.bin: not found; run 00_teacher.py first"),
    ("02_distill.py", ["--from_scratch=False"], "student_scratch.pt: not found; run 01_architecture.py first"),
    ("03_prune.py", [], "student_kd.pt: not found; run 02_distill.py first"),
    ("04_quantize.py", ["--variants=q9"], "--variants='q9': give a comma-separated list"),
]
if not torch.cuda.is_available():
    CHECKED_FIRST += [("01_architecture.py", ["--device=cuda"], "--device=cuda: no CUDA device here"),
                      ("01_architecture.py", ["--device=cuda:3"], "--device=cuda:3: no CUDA device here")]
if not torch.backends.mps.is_available():
    CHECKED_FIRST.append(("01_architecture.py", ["--device=mps"], "--device=mps: no Apple GPU here"))
CHECKED_FIRST += [("01_architecture.py", ["--device=cuda:x"], "--device=cuda:x is out of range"),
                  ("01_architecture.py", [], "results.json: damaged results log"),
                  ("02_distill.py", [], "teacher_resnet18.json: damaged; delete it")]


@pytest.mark.parametrize("script, extra, message", CHECKED_FIRST)
def test_bad_settings_and_missing_inputs_stop_before_any_work(tmp_path, script, extra, message):
    ck = tmp_path / "ck"
    ck.mkdir()
    if "from_scratch" in " ".join(extra) or "teacher_resnet18.json" in message:
        torch.save(common.make_teacher(11).state_dict(), ck / files.TEACHER_FILE)
    if "teacher_resnet18.json" in message:
        (ck / "teacher_resnet18.json").write_text("{")
    if "results.json" in message:
        (ck / files.RESULTS).write_text('{"not": "a list"}')
    proc = run_script(script, f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}", *extra)  # default data
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""  # no notice, no data line: nothing before the error
    assert not (tmp_path / "cache").exists()


# --- saying where things went -----------------------------------------------------------------

def test_the_sample_notice_is_one_line_printed_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(settings, "REPO", tmp_path)
    script = {"data_dir": settings.DEFAULT_DATA_DIR, "img_size": 224, "resize": 0, "epochs": 40,
              "cache_dir": ""}
    cfg = settings.configure(script, [])
    common.data_for(cfg, splits=("training", "validation"))
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and len(notices[0]) < 120, out


def test_the_byte_column_of_01_is_the_file_it_writes(sample_root, tmp_path):
    ck = tmp_path / "ck"
    proc = run_script("01_architecture.py", f"--data_dir={sample_root}", f"--ckpt_dir={ck}",
                      f"--cache_dir={tmp_path / 'cache'}", *FAST, "--epochs=1")
    assert proc.returncode == 0, proc.stderr
    row = re.search(r"^student\s+([\d,]+)\s+([\d,]+)", proc.stdout, flags=re.M)
    assert int(row.group(2).replace(",", "")) == files.file_bytes(ck / "student_scratch.pt")
    record = {r["model"]: r for r in files.read_results(ck)}["student_scratch"]
    assert record["bytes"] == files.file_bytes(ck / "student_scratch.pt")
    assert "cpu ms @1 (median, min-max of 11)" in proc.stdout


def test_04_says_where_its_files_and_records_went(pipeline):
    ck, runs, _ = pipeline
    out = runs["04_quantize.py"].stdout
    assert f"files in {ck} (*.npz, *.z.npz, frontier.png, predictions.csv) and {ck / 'results.json'}" in out


def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"the good model")

    def no_space(f):
        raise OSError(28, "No space left on device")
    with pytest.raises(running.UserError, match="could not be written \\(No space left on device\\)"):
        files.atomic_write(path, no_space)
    assert path.read_bytes() == b"the good model" and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"model": "x"}', b"\xff\xfe not text", b"[{}]"])
def test_a_damaged_results_log_is_one_line(tmp_path, content):
    (tmp_path / files.RESULTS).write_bytes(content)
    with pytest.raises(running.UserError, match="damaged results log"):
        files.read_results(tmp_path)


def test_publish_replaces_nothing_when_an_output_cannot_be_replaced(tmp_path):
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"old " + name.encode())
        files.new_path(tmp_path / name).write_bytes(b"new " + name.encode())
    (tmp_path / "c.pt").mkdir()  # a folder where an output should go
    files.new_path(tmp_path / "c.pt").write_bytes(b"new c")
    with pytest.raises(running.UserError, match="is a folder"):
        files.publish(tmp_path, [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"])
    assert (tmp_path / "a.pt").read_bytes() == b"old a.pt" and (tmp_path / "b.pt").read_bytes() == b"old b.pt"
    assert not (tmp_path / files.RESULTS).exists()


def test_a_new_run_of_a_stage_drops_the_rows_it_makes_stale(tmp_path):
    def rows(*pairs):
        return [{"stage": stage, "model": model} for stage, model in pairs]
    files.publish(tmp_path, records=rows(("0 teacher", "teacher"), ("1 architecture", "student_scratch"),
                                         ("2 distillation", "student_kd"), ("3 pruning", "round_0.8"),
                                         ("3 pruning", "round_0.328"), ("4 quantization", "final"),
                                         ("5 deployment", "final.onnx")))

    def models():
        return [r["model"] for r in files.read_results(tmp_path)]
    files.publish(tmp_path, records=rows(("1 architecture", "student_scratch")))  # feeds no later stage
    assert models() == ["teacher", "student_kd", "round_0.8", "round_0.328", "final", "final.onnx", "student_scratch"]
    files.publish(tmp_path, records=rows(("3 pruning", "round_0.8")))  # fewer rounds this time
    assert models() == ["teacher", "student_kd", "student_scratch", "round_0.8"]
    files.publish(tmp_path, records=rows(("4 quantization", "final")))
    files.publish(tmp_path, records=rows(("5 deployment", "final.onnx")))  # keeps the final 05 deployed
    assert models() == ["teacher", "student_kd", "student_scratch", "round_0.8", "final", "final.onnx"]
    files.publish(tmp_path, records=rows(("4 quantization", "final")))  # the old deployment goes
    assert models() == ["teacher", "student_kd", "student_scratch", "round_0.8", "final"]
    files.publish(tmp_path, records=rows(("2 distillation", "student_kd")))
    assert models() == ["teacher", "student_scratch", "student_kd"]


def test_a_rerun_removes_only_what_the_run_of_its_stage_it_replaces_wrote(tmp_path, capsys):
    def run(stage, names, replaces=True):
        for name in names:
            files.new_path(tmp_path / name).write_bytes(b"new")
        files.publish(tmp_path, [tmp_path / n for n in names], [{"stage": stage, "model": names[0]}],
                      replaces_outputs=replaces)

    def folder():
        return sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "mine.pt").write_bytes(b"a user's file")
    run("2 distillation", ["student_kd.pt"], replaces=False)
    run("3 pruning", ["round_a.pt", "round_b.pt", "plot.png"])
    run("4 quantization", ["round_a.q8.npz", "round_b.q8.npz", "round_b.q4.npz"])
    assert "removed" not in capsys.readouterr().out
    run("3 pruning", ["round_a.pt", "plot.png"])  # one round fewer
    assert "removed what the run this one replaces wrote and this one did not: round_b.pt\n" in capsys.readouterr().out
    assert "round_b.pt" not in folder() and "round_b.q8.npz" in folder()  # 04's files wait for 04's rerun
    # the whole pipeline again: 02 makes 03's and 04's outputs stale (said), and their reruns remove what they no longer make
    run("2 distillation", ["student_kd.pt"], replaces=False)
    assert capsys.readouterr().out == ("now stale, made from what this run replaced (rerun their stages): round_a.pt, "
                                       "plot.png, round_a.q8.npz, round_b.q8.npz, round_b.q4.npz\n")
    run("3 pruning", ["round_a.pt", "plot.png"])
    run("4 quantization", ["round_a.q8.npz"])
    assert "this one did not: round_b.q4.npz, round_b.q8.npz\n" in capsys.readouterr().out
    assert folder() == ["mine.pt", "outputs.json", "plot.png", "results.json", "round_a.pt", "round_a.q8.npz",
                        "student_kd.pt"]


def test_a_new_teacher_or_a_new_start_drops_what_was_made_from_the_old_one(tmp_path):
    def later_rows(teacher="aaaa", **kd):
        return [{"stage": "1 architecture", "model": "student_scratch"},
                {"stage": "2 distillation", "model": "student_kd", "teacher_sha1": teacher, **kd},
                {"stage": "3 pruning", "model": "student_pruned"}, {"stage": "4 quantization", "model": "final"}]

    def models():
        return [r["model"] for r in files.read_results(tmp_path)]

    def log(*rows):
        files.atomic_json(tmp_path / files.RESULTS, list(rows))
    teacher = {"stage": "0 teacher", "model": "teacher", "sha1": "aaaa", "val_correct": "ff"}
    everything = ["student_scratch", "student_kd", "student_pruned", "final", "teacher"]
    log(teacher, *later_rows())
    files.publish(tmp_path, records=[teacher])  # 00 re-scored the file 02 distilled from
    assert models() == everything
    files.publish(tmp_path, records=[{**teacher, "sha1": "bbbb"}])  # 00 trained a new one
    assert models() == ["student_scratch", "teacher"]
    log(*later_rows())  # no stage-0 row: 02's record says which teacher it had
    files.publish(tmp_path, records=[{**teacher, "sha1": "bbbb"}])
    assert models() == ["student_scratch", "teacher"]
    log({**teacher, "sha1": "old0"}, *later_rows())  # the stage-0 row is older than 02's teacher
    files.publish(tmp_path, records=[teacher])
    assert models() == everything
    old_teacher = {"stage": "0 teacher", "model": "teacher", "val_correct": "ff"}  # rows from before the SHA-1s
    old_kd = [{k: v for k, v in r.items() if k != "teacher_sha1"} for r in later_rows()]
    log(old_teacher, *old_kd)
    files.publish(tmp_path, records=[teacher])  # the same predictions: the same teacher
    assert models() == everything
    log(old_teacher, *old_kd)
    files.publish(tmp_path, records=[{**teacher, "val_correct": "fe"}])
    assert models() == ["student_scratch", "teacher"]

    log(teacher, *later_rows(start="student_scratch"))
    files.publish(tmp_path, records=[{"stage": "1 architecture", "model": "student_scratch"}])  # 02 started from it
    assert models() == ["teacher", "student_scratch"]
    log(teacher, *later_rows())
    files.publish(tmp_path, records=[{"stage": "1 architecture", "model": "student_scratch"}])  # 02 did not
    assert models() == ["teacher", "student_kd", "student_pruned", "final", "student_scratch"]


def test_ctrl_c_waits_for_the_swap_even_when_another_thread_gets_it():
    import threading
    done = []
    with pytest.raises(KeyboardInterrupt):
        with running.signals_deferred():
            worker = threading.Thread(target=lambda: os.kill(os.getpid(), signal.SIGINT))
            worker.start()
            worker.join()
            time.sleep(0.2)
            done.append("the block finished")
    assert done == ["the block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_damaged_image_cache_is_decoded_again(sample_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = images.load_split(sample_root, "validation", 18, cache_dir=cache)
    [path] = cache.glob("*validation*.npz")
    path.write_bytes(path.read_bytes()[:100])
    again = images.load_split(sample_root, "validation", 18, cache_dir=cache)
    assert torch.equal(first.images, again.images) and "damaged cache" in capsys.readouterr().err


@pytest.mark.parametrize("make_bad", [lambda p: p.write_bytes(b"\xff\xfe\x00bad"), lambda p: p.mkdir()])
def test_an_unreadable_classes_txt_is_one_line(sample_root, tmp_path, make_bad):
    root = tmp_path / "food"
    shutil.copytree(sample_root, root)
    make_bad(root / "classes.txt")
    with pytest.raises(running.UserError, match="classes.txt: cannot be read"):
        common.load_data(root, 18)


def test_the_plot_survives_rounds_that_all_score_the_same(tmp_path):
    rows = [{"keep": k, "params": 1000 * k, "bytes": 4000 * k, "acc_before": 1.0, "acc_after": 1.0,
             "ci_after": (0.8, 1.0)} for k in (0.8, 0.64)]
    plots.plot_rounds(tmp_path / "p.png", rows, {"params": 1000, "bytes": 4000, "acc": 1.0})
    assert (tmp_path / "p.png").stat().st_size > 1000


def drawn(monkeypatch, plot, *args):
    """The figure a plot function would save, drawn, and its renderer."""
    figures = []
    monkeypatch.setattr(plots, "save_png", lambda path, fig: figures.append(fig))
    plot(*args)
    figures[0].canvas.draw()
    return figures[0], figures[0].canvas.get_renderer()


def apart(boxes):
    return not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def label_boxes(ax, renderer):  # the text alone, without a label's line to its point
    return [matplotlib.text.Text.get_window_extent(t, renderer) for t in ax.texts]


def test_the_rounds_plot_keeps_its_labels_apart_and_rings_the_round_kept(tmp_path, monkeypatch):
    rows = [{"keep": round(0.7 ** k, 3), "params": 1_000_000 * 0.7 ** k, "bytes": 4_000_000 * 0.7 ** k,
             "acc_before": 0.5, "acc_after": 0.55 + 0.002 * k, "ci_after": (0.5, 0.6)} for k in range(1, 6)]
    fig, renderer = drawn(monkeypatch, plots.plot_rounds, tmp_path / "p.png", rows,
                          {"params": 1_000_000, "bytes": 4_000_000, "acc": 0.56}, rows[1])
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t.get_window_extent(renderer) for v, t in zip(ax.xaxis.get_majorticklocs(), ax.xaxis.get_majorticklabels())
                 if lo <= v <= hi and t.get_text()]
        assert len(ticks) >= 2 and apart(ticks)  # not "800k900k1M"
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"keep {r['keep']:.2f}" for r in rows)
        assert apart(label_boxes(ax, renderer))
    assert "kept: keep 0.49 (student_pruned.pt)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


class Val:
    """A Score as the plots read it: an accuracy and its 95% interval."""

    def __init__(self, acc, ci):
        self.acc, self.ci = acc, ci

    def interval(self):
        return self.ci


def test_the_frontier_labels_the_files_compared_apart_with_their_intervals(tmp_path, monkeypatch):
    files = [{"bytes": 30_000 * 1.01 ** k, "val": Val(0.5 + 0.001 * (k % 5), (0.45, 0.56)), "label": f"file{k}",
              "front": k % 3 == 0} for k in range(30)]
    kd = {"bytes": 1_000_000, "val": Val(0.55, (0.5, 0.6)), "label": "student_kd.pt", "front": False}
    fig, renderer = drawn(monkeypatch, plots.plot_frontier, tmp_path / "f.png", files + [kd], 0.55, files[4], [kd], 0.53)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted([f"file{k}" for k in range(0, 30, 3)] + ["file4", "student_kd.pt"])
    assert apart(label_boxes(ax, renderer))
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert sum(len(c.lines[2][0].get_segments()) for c in bars) == len(files) + 1  # every file's 95% interval
    assert "teacher (0.530)" in [t.get_text() for t in ax.get_legend().get_texts()]


# --- Ctrl-C inside a write, and just after a stage has written ----------------------------------

def test_ctrl_c_inside_torch_save_is_an_interruption_not_a_full_disk(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"the good state")

    class CtrlCMidway:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()
    with pytest.raises(KeyboardInterrupt):  # torch.save wraps it in a RuntimeError
        files.atomic_write(path, lambda f: torch.save({"w": torch.zeros(100_000)}, CtrlCMidway(f)))
    assert path.read_bytes() == b"the good state" and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.1])
def test_ctrl_c_after_a_stage_said_it_wrote_changes_nothing(finished, delay):
    """The `wrote` line is printed once the run is over and Ctrl-C is ignored: a signal sent when
    the line arrives (unbuffered) is never seen, whatever the teardown is doing then."""
    ck, args = finished
    proc = start("02_distill.py", [*args, "--epochs=1"])
    for line in proc.stdout:
        if line.startswith("wrote "):
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail("no wrote line")
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0 and "interrupted" not in err and "Traceback" not in err, (proc.returncode, err)


def test_ctrl_c_after_the_outputs_were_published_says_they_are_written(finished, monkeypatch, capsys):
    """Between publishing and the `wrote` line a Ctrl-C still interrupts: one line, 130, and the
    outputs it had just written stay."""
    ck, args = finished
    module = load_script("02_distill.py")
    interrupt_inside(monkeypatch, files, "say_written")
    monkeypatch.setattr(sys, "argv", ["02_distill.py", *overridden([*args, "--epochs=1", "--seed=7"])])
    with pytest.raises(SystemExit) as stop:
        running.run(module.main)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert_one_line(err)
    assert "the run had finished; its outputs are written" in err
    assert {r["model"]: r for r in files.read_results(ck)}["student_kd"]["seed"] == 7


def test_a_state_of_another_starting_model_is_not_resumed(sample_root, tmp_path):
    """Re-running 03 changes student_pruned.pt: a QAT state made from the old one must not go on."""
    data = common.load_data(sample_root, 18, select_fraction=0.1)
    path = tmp_path / "m.pt"

    def fit(seed, resume):
        torch.manual_seed(seed)
        return common.fit(common.StudentNet(num_classes=11), data, common.cross_entropy(), epochs=1, lr=1e-3,
                          batch_size=16, augment=common.Augment(16), norm="imagenet", device=torch.device("cpu"),
                          out=Resumable(path, {"resume": resume}))
    fit(0, resume=False)
    assert fit(0, resume=True)["epoch"] == 1  # the same start: the finished state is reused
    with pytest.raises(running.UserError, match="made with another starting model; delete it"):
        fit(1, resume=True)


def test_fit_keeps_its_last_epoch_though_an_earlier_one_scored_better(sample_root, tmp_path, capsys):
    """The selection split chooses among the files of 03 and 04; a fit that kept its best epoch
    there would enter that choice with an optimistic edge."""
    data = common.load_data(sample_root, 18, select_fraction=0.1)
    out = Resumable(tmp_path / "m.pt", {"resume": False})
    ce = common.cross_entropy()

    def unlearn(logits, batch):  # every epoch worse on the selection split than the one before
        return -ce(logits, batch)
    torch.manual_seed(0)
    model = common.StudentNet(num_classes=11)
    kept = common.fit(model, data, unlearn, epochs=3, lr=1e-2, batch_size=16, augment=common.Augment(16),
                      norm="imagenet", device=torch.device("cpu"), out=out)
    losses = [float(x) for x in re.findall(r"select loss (\S+)", capsys.readouterr().out)]
    assert len(losses) == 3 and losses[0] < losses[-1]  # epoch 1 was the best there
    saved, _, metrics = common.load_model(out.best)
    assert kept["epoch"] == metrics["epoch"] == 3 and metrics["select_loss"] == kept["select_loss"]
    assert abs(kept["select_loss"] - losses[-1]) < 1e-3
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), common.cpu_state_dict(model).values()))


def test_a_pruning_round_after_a_sparsity_fine_tune_resumes(finished):
    """The round's own fine-tune has no L1 term, though the stage's sparsity setting has one."""
    ck, args = finished
    extra = ["--sparsity=1e-4", "--sparsity_epochs=1", "--finetune_epochs=8", "--prune_count=1", "--max_loss_rise=1e9"]
    proc = start("03_prune.py", [*args, *extra])
    wait_for(ck / "student_pruned_0.800_global_sparse.pt.resume.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script("03_prune.py", *args, *extra, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming round 1 from" in resumed.stdout and "resuming sparsity from" in resumed.stdout
