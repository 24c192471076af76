"""docs/study.py: the recipe studies' tables and the patience plot, read from finished runs."""
import shutil

from conftest import run_script


def test_the_patience_study_reads_each_epochs_folder_and_draws_the_plot(pipeline, sample_root, tmp_path):
    ckpt, _, _ = pipeline
    for epochs in (2, 5):  # two runs of the study, here copies of the sample pipeline's
        folder = tmp_path / f"ep{epochs}"
        folder.mkdir()
        for name in ("student_kd.pt", "student_scratch.pt", "teacher_resnet18.bin", "teacher_resnet18.json"):
            if (ckpt / name).exists():
                shutil.copy(ckpt / name, folder / name)
    (tmp_path / "ep9").mkdir()  # no student_kd.pt: not part of the study
    plot = tmp_path / "epochs.png"
    run = run_script("docs/study.py", f"--data_dir={sample_root}", f"--prefix={tmp_path / 'ep'}", f"--plot={plot}",
                     "--device=cpu", f"--cache_dir={tmp_path / 'cache'}")
    assert run.returncode == 0, run.stderr
    rows = [line.split(maxsplit=1) for line in run.stdout.splitlines() if line[:1].isdigit()]
    assert [r[0] for r in rows] == ["2", "5"] and rows[0][1] == rows[1][1]  # copies: the same scores
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = f"--models={tmp_path / 'ep2' / 'student_kd.pt'},{tmp_path / 'ep5' / 'student_scratch.pt'}"
    run = run_script("docs/study.py", f"--data_dir={sample_root}", models, "--device=cpu",
                     f"--cache_dir={tmp_path / 'cache'}")
    assert run.returncode == 0, run.stderr
    assert "minus the first" in run.stdout and "minus the teacher" in run.stdout


def test_the_study_says_what_it_needs_in_one_line(tmp_path, sample_root):
    for args in ([], [f"--data_dir={sample_root}", f"--prefix={tmp_path / 'none'}"]):
        run = run_script("docs/study.py", *args)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
