"""compare.py: a run's table (the one 04 ends with), runs compared stage by stage, --seeds pooled,
--models scored; each number checked against Scores computed here."""
import json
import shutil

import numpy as np
import pytest

import common
from conftest import run_script
from support import files, reports
from support.settings import Settings
from support.stats import Score, paired


@pytest.fixture(scope="module")
def two_runs(pipeline, tmp_path_factory):
    """Run A: the sample pipeline's folder. Run B: a copy with 02 run again with another seed,
    then 03 and 04 otherwise (one pruning round, other files), so its models differ."""
    ck, _, args = pipeline
    other = tmp_path_factory.mktemp("compare") / "ck"
    shutil.copytree(ck, other)
    for script, extra in [("02_distill.py", ["--epochs=2", "--sparsity=1e-4", "--seed=1"]), ("03_prune.py", ["--prune_count=1", "--finetune_epochs=1", "--max_loss_rise=1e9"]),
                          ("04_quantize.py", ["--variants=q8", "--qat_variants=", "--max_loss_rise=1e9"])]:
        proc = run_script(script, *args, f"--ckpt_dir={other}", *extra)
        assert proc.returncode == 0, proc.stderr
    return ck, other


def compare(*args):
    proc = run_script("compare.py", *map(str, args))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def table_rows(out):
    """{(first cell, second cell): cells} of every Markdown row printed."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {tuple(r[:2]): r for r in rows[1:]}


def recorded(folder, model):
    return reports.recorded_score(next(r for r in files.read_results(folder) if r["model"] == model))


def direct_scores(sample_root, tmp_path, *paths):
    """Each file scored here on the sample's validation images, as the pipeline scored them."""
    cfg = Settings({"img_size": 16, "resize": 18, "batch_size": 16, "data_dir": str(sample_root),
                    "cache_dir": str(tmp_path / "cache")})
    data = common.load_data(sample_root, 18, cfg.cache_dir, ("validation",))
    score = common.Scorer(data, cfg, common.torch.device("cpu"))
    return [score(*common.load_model(p)[:2]) for p in paths]


def test_one_run_prints_the_table_04_ends_with(pipeline):
    ck, runs, _ = pipeline
    out = compare(ck)
    assert out == reports.run_table_text(files.read_results(ck)) + "\n"
    ending = runs["04_quantize.py"].stdout.rsplit("\nwrote ", 1)[0].rstrip()
    assert ending.endswith("\n" + out.rstrip())
    head = out.splitlines()[1]
    assert head.startswith("| model | params | bytes | val acc [95% CI] |")
    rows = [r[0] for r in table_rows(out).values()]
    final = next(r for r in files.read_results(ck) if r["model"] == "final")["file"]
    assert rows == ["teacher (teacher_resnet18.bin)", "scratch (student_scratch.pt)", "distilled (student_kd.pt)",
                    "pruned (student_pruned.pt)", f"final ({final})", "final - teacher"]


def test_each_stage_against_the_first_run_is_what_scoring_the_files_gives(two_runs, sample_root, tmp_path):
    a, b = two_runs
    out = compare(a, b)
    rows = table_rows(out)
    final_a, final_b = (next(r for r in files.read_results(f) if r["model"] == "final")["file"] for f in (a, b))
    assert final_a != final_b
    for stage, name_a, name_b in [("pruned", "student_pruned.pt", "student_pruned.pt"), ("final", final_a, final_b)]:
        sa, sb = direct_scores(sample_root, tmp_path, a / name_a, b / name_b)
        assert np.array_equal(sa.correct, recorded(a, reports.model_of_file(name_a)).correct)
        row_a, row_b = rows[f"{stage} ({name_a})", str(a)], rows[f"{stage} ({name_b})", str(b)]
        assert row_a[4] == str(sa) and row_b[4] == str(sb)
        d = paired(sa, sb)
        assert row_b[5] == reports.difference_text(d) and row_b[6] == f"{d['p']:.3g}"
    assert f"{a}: 16 px centre crops, shorter side resized to 18" in out and f"final file {final_b}" in out


def test_seeds_pool_every_runs_images(two_runs):
    a, b = two_runs
    rows = {k[0]: r for k, r in table_rows(compare("--seeds", a, b)).items()}
    pooled = {}
    for stage, model in [("distilled", "student_kd"), ("pruned", "student_pruned"), ("teacher", "teacher_resnet18")]:
        scores = [recorded(f, model) for f in (a, b)]
        pooled[stage] = Score(np.concatenate([s.correct for s in scores]), "pooled")
        accs = [s.acc for s in scores]
        assert rows[stage][1] == f"{np.mean(accs):.4f}" and rows[stage][2] == f"{min(accs):.4f}-{max(accs):.4f}"
    assert pooled["pruned"].n == 2 * recorded(a, "student_kd").n
    d = paired(pooled["distilled"], pooled["pruned"])
    assert rows["pruned"][3] == reports.difference_text(d) and rows["pruned"][4] == f"{d['p']:.3g}"


def test_models_are_scored_against_the_first_and_the_teacher(two_runs, sample_root, tmp_path):
    a, b = two_runs
    paths = [a / "student_kd.pt", b / "student_pruned.pt"]
    out = compare(f"--data_dir={sample_root}", f"--models={paths[0]},{paths[1]}", "--device=cpu",
                  f"--cache_dir={tmp_path / 'cache'}")
    kd, pruned = direct_scores(sample_root, tmp_path, *paths)
    row = table_rows(out)[str(paths[1]), str(pruned)]
    d = paired(kd, pruned)
    assert row[2] == f"{reports.difference_text(d)}, p {d['p']:.3g}"
    assert "minus the teacher" in out


def test_runs_on_other_images_or_without_a_log_are_one_line(two_runs, tmp_path):
    a, b = two_runs
    edited = tmp_path / "edited"
    edited.mkdir()
    rows = files.read_results(b)
    (edited / files.RESULTS).write_text(json.dumps([{**r, "val_key": "0123456789abcdef"} for r in rows]))
    (tmp_path / "empty").mkdir()
    for args, said in [((a, edited), f"{edited}: scored on other validation images than {a}"),
                       ((a, tmp_path / "empty"), "results.json: not found or empty"),
                       ((), "give run folders")]:
        proc = run_script("compare.py", *map(str, args))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert said in proc.stderr


def test_seeds_need_runs_of_different_seeds_and_runs_of_other_crops_need_saying_so(two_runs, tmp_path):
    a, _ = two_runs
    again, crops = tmp_path / "again", tmp_path / "crops"
    shutil.copytree(a, again)
    shutil.copytree(a, crops)
    model, preprocess, metrics = common.load_model(crops / "student_kd.pt")
    common.save_checkpoint(crops / "student_kd.pt", model, {**preprocess, "img_size": 14}, metrics)
    for args, said in [(("--seeds", a, again), "--seeds needs two or more runs of different seeds"),
                       (("--seeds", a), "--seeds needs two or more runs"),
                       ((a, f"{a}/"), "a run is given twice"),
                       ((a, crops), f"{crops} was made with other preprocessing than {a}")]:
        proc = run_script("compare.py", *map(str, args))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert said in proc.stderr
    assert "14 px centre crops" in compare(a, crops, "--other_preprocessing=True")
