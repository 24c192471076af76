"""The stages as a user runs them: subprocesses on tiny generated data, one epoch each."""
import csv
import json
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

import common
from support import files
from conftest import load_script, run_script


def test_teacher_is_a_plain_state_dict_with_a_preprocessing_note(pipeline):
    ck, runs, args = pipeline
    sd = torch.load(ck / "teacher_resnet18.bin", weights_only=True)
    assert common.arch_from_state_dict(sd) == {"kind": "resnet18", "num_classes": 11}
    assert json.loads((ck / "teacher_resnet18.json").read_text())["norm"] == "none"
    assert "training from scratch" in runs["00_teacher.py"].stdout
    again = run_script("00_teacher.py", *args)
    assert again.returncode == 0 and "not retraining" in again.stdout


def test_architecture_prints_both_models_and_trains_the_baseline(pipeline):
    ck, runs, args = pipeline
    out = runs["01_architecture.py"].stdout
    assert "256,779" in out and "11,182,155" in out and "cnn.7.3" in out
    assert "scratch epoch   2/2" in out
    model, preprocess, metrics = common.load_model(ck / "student_scratch.pt")
    assert {k: preprocess[k] for k in ("norm", "img_size", "resize", "select_fraction")} == \
        {"norm": "imagenet", "img_size": 16, "resize": 18, "select_fraction": 0.1}
    assert len(preprocess["select_key"]) == 16
    assert 0 <= metrics["select_acc"] <= 1 and metrics["epoch"] in (1, 2)


def test_distillation_saves_student_kd_and_compares(pipeline):
    ck, runs, args = pipeline
    out = runs["02_distill.py"].stdout
    for row in ("teacher (ResNet18)", "student from scratch", "distilled student"):
        assert row in out
    assert "student from scratch (mix=none)" in out  # 02 mixed its views (its default), 01 did not (the fixture's --mix=none)
    assert common.load_model(ck / "student_kd.pt")[0].widths == common.student_widths()
    rows = {files.stage_of(r): r for r in files.read_results(ck)}  # which teacher made student_kd
    assert rows["0"]["sha1"] == files.file_sha1(ck / files.TEACHER_FILE)[:16] == rows["2"]["teacher_sha1"]


def test_pruning_rounds_shrink_and_fine_tuning_changes_weights(pipeline):
    ck, _, _ = pipeline
    prune = load_script("03_prune.py")
    kd = common.load_model(ck / "student_kd.pt")[0]
    for keep in (0.8, 0.64):
        path = ck / f"student_pruned_{keep:.3f}_global.pt"
        pruned = common.load_model(path)[0]
        fresh = prune.prune_model(kd, keep, prune.GROUPS, "global", prune.channel_multiple)
        assert pruned.widths == fresh.widths and all(w % 16 == 0 for w in pruned.widths)  # the default multiple
        assert not torch.equal(pruned.cnn[5][3].weight, fresh.cnn[5][3].weight)  # it was trained
    assert (ck / "student_pruned.pt").exists()
    assert cv2.imread(str(ck / "pruning_global.png")).shape[:2] == (460, 1100)  # matplotlib, 11 x 4.6 in


def test_quantized_files_predictions_and_the_table(pipeline, sample_root):
    ck, runs, args = pipeline
    out = runs["04_quantize.py"].stdout
    assert "final model, chosen on selection:" in out and "every stage" in out
    assert "student_kd - student_scratch" in out and "McNemar p" in out
    for name in ("student_kd.q8.npz", "student_kd.q8.z.npz", "student_pruned.q4c.npz",
                 "student_pruned.mix3.npz", "student_pruned.qat.mix3.npz", "student_pruned.qat.mix3.z.npz"):
        with np.load(ck / name, allow_pickle=False):
            pass
    assert "QAT: student_pruned through mix3's codes, 1 epochs (distillation" in out
    assert "QAT mix3 epoch   1/1" in out and "the last kept" in out
    assert "control: student_pruned in float, 1 epochs (distillation" in out  # the same epochs, in float
    assert "student_pruned.mix3 (post-training)" in out and "student_pruned.qat.mix3" in out
    assert "student_pruned.ft.mix3 (float fine-tune, post-training)" in out
    assert "the teacher is not loaded" in out  # QAT read the bank 02 built
    front = [line for line in out.splitlines() if re.search(r"\s\*\s*(<-)?\s*$", line)]
    assert front, "the frontier marks some files"
    assert cv2.imread(str(ck / "frontier.png")).shape[:2] == (560, 900)
    rows = list(csv.reader(open(ck / "predictions.csv")))
    assert rows[0] == ["Id", "Category"]
    ids = [int(r[0]) for r in rows[1:]]
    assert ids == list(range(13))  # 0000.jpg -> 0, in numeric order
    assert all(0 <= int(r[1]) < 11 for r in rows[1:])
    records = files.read_results(ck)
    assert {r["stage"] for r in records} == {"0 teacher", "1 architecture", "2 distillation", "3 pruning",
                                             "4 quantization"}
    quantized = [r for r in records if r["stage"] == "4 quantization"]
    assert all(r["select_loss"] > 0 for r in quantized)  # every file's score on the split that chose: re-derivable


def test_a_byte_budget_bounds_the_final_file(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    run = ["--variants=fp16,q8,q4c", "--qat_variants=", *args, f"--ckpt_dir={work}"]
    written = [r for r in files.read_results(ck) if r["stage"] == "4 quantization" and "bytes_zip" in r]
    budget = sorted(min(r["bytes"], r["bytes_zip"]) for r in written)[-2] - 1  # the largest file is out
    proc = run_script("04_quantize.py", *run, "--max_loss_rise=0", f"--max_bytes={budget}")
    assert proc.returncode == 0, proc.stderr
    chosen = re.search(r"final model, chosen on selection: \S+: ([\d,]+) bytes", proc.stdout).group(1)
    assert int(chosen.replace(",", "")) <= budget
    assert f"selection loss at most 0% above student_kd's, of at most {budget:,} bytes)" in proc.stdout
    final = [r for r in files.read_results(work) if r["model"] == "final"][0]
    assert final["bytes"] <= budget


def test_the_final_file_is_compared_with_the_checkpoint_it_encodes(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    round_name = sorted(work.glob("student_pruned_*.pt"))[0].stem  # a round, not student_pruned.pt
    proc = run_script("04_quantize.py", *args, f"--ckpt_dir={work}", f"--models={round_name}", "--variants=q8",
                      "--qat_variants=")
    assert proc.returncode == 0, proc.stderr
    final = [r for r in files.read_results(work) if r["model"] == "final"][0]
    assert final["from"] == round_name and final["file"].startswith(round_name + ".")
    assert f"final file ({final['file']}) - {round_name} " in proc.stdout
    assert f"final file ({final['file']}) - student_pruned " not in proc.stdout


def test_later_stages_use_the_preprocessing_and_selection_student_kd_records(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    plain = [a for a in args if not a.startswith(("--img_size", "--resize", "--ckpt_dir"))]
    plain += [f"--ckpt_dir={work}", "--variants=fp16", "--models=student_kd"]
    proc = run_script("04_quantize.py", *plain)  # the script's defaults would be 224 / 256 px
    assert proc.returncode == 0, proc.stderr
    assert "(18 px stored, 16 px crops)" in proc.stdout and "note:" not in proc.stdout
    assert "selection 11 (held out" in proc.stdout and "trained on" not in proc.stderr
    proc = run_script("04_quantize.py", *plain, "--img_size=17", "--select_fraction=0.2", "--other_selection=True")
    assert proc.returncode == 0, proc.stderr
    assert "note: student_kd.pt was made with img_size=16; using --img_size=17" in proc.stdout
    assert "note: student_kd.pt was made with select_fraction=0.1; using --select_fraction=0.2" in proc.stdout
    assert "(19 px stored, 17 px crops)" in proc.stdout
    assert "student_kd.pt was made with the selection split select_fraction=0.1" in proc.stderr and "may have been trained on" in proc.stderr


@pytest.mark.parametrize("script, extra", [("03_prune.py", []), ("04_quantize.py", []),
                                           ("02_distill.py", ["--from_scratch=False", "--epochs=1"])])
def test_another_selection_split_is_an_error_unless_asked_for(pipeline, tmp_path, script, extra):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    source = "student_scratch.pt" if script == "02_distill.py" else "student_kd.pt"
    proc = run_script(script, *args, f"--ckpt_dir={work}", "--select_fraction=0.3", *extra)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {source} was made with select_fraction=0.1, this run has "
                                  "--select_fraction=0.3") and "--other_selection=True" in proc.stderr
    assert "Traceback" not in proc.stderr
    if script == "03_prune.py":  # asked for: it runs, and warns
        proc = run_script(script, *args, f"--ckpt_dir={work}", "--select_fraction=0.3", "--other_selection=True",
                          "--prune_count=1", "--finetune_epochs=0", "--max_loss_rise=1e9")
        assert proc.returncode == 0 and "may have been trained on" in proc.stderr, proc.stderr


def test_select_fraction_zero_says_the_numbers_are_optimistic(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    proc = run_script("02_distill.py", *args, f"--ckpt_dir={work}", "--epochs=1", "--select_fraction=0")
    assert proc.returncode == 0, proc.stderr
    assert "distill epoch   1/1" in proc.stdout and "  val loss" in proc.stdout
    proc = run_script("03_prune.py", *args, f"--ckpt_dir={work}", "--prune_count=1", "--finetune_epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"select_fraction=0.0[^;]* from student_kd.pt", proc.stdout)
    assert "the round chosen on validation (optimistic)" in proc.stdout


def test_the_final_lines_say_what_chose_the_model(pipeline, tmp_path):
    """Where no round passes the rule, 03 names the fallback that chose, not the rule it failed;
    where no file fits the budget, 04 says the smallest was kept."""
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    run = [*args, f"--ckpt_dir={work}"]
    proc = run_script("03_prune.py", *run, "--prune_count=1", "--finetune_epochs=1", "--lr=1",
                      "--max_loss_rise=0")  # a fine-tune at lr 1 leaves the round far worse than student_kd
    assert proc.returncode == 0, proc.stderr
    assert "no round passes the rule" in proc.stderr
    assert re.search(r"^student_pruned.pt = keep 0.8 .*; the best on selection \(none passed the rule: selection "
                     r"loss at most 0% above student_kd's\)\)$", proc.stdout, flags=re.M), proc.stdout
    proc = run_script("04_quantize.py", *run, "--variants=fp16", "--qat_variants=", "--max_bytes=1")
    assert proc.returncode == 0, proc.stderr
    assert "keeping the smallest" in proc.stderr
    assert re.search(r"^final model, chosen on selection: .*; the smallest \(none fits the budget of 1 bytes\)\)$",
                     proc.stdout, flags=re.M), proc.stdout


def test_a_rerun_with_fewer_files_or_rounds_removes_the_ones_it_replaces(pipeline, tmp_path):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    run = [*args, f"--ckpt_dir={work}", "--max_loss_rise=1e9"]
    before = {p.name for p in work.iterdir()}
    proc = run_script("04_quantize.py", *run, "--variants=fp16", "--qat_variants=")  # was fp16,q8,q4c and QAT mix3
    assert proc.returncode == 0, proc.stderr
    left = {p.name for p in work.iterdir()}
    npz = sorted(n for n in left if n.startswith("student") and n.endswith(".npz"))  # not the teacher bank
    assert npz == ["student_kd.fp16.npz", "student_kd.fp16.z.npz", "student_pruned.fp16.npz", "student_pruned.fp16.z.npz"]
    gone = sorted(before - left)
    assert "student_pruned.qat.mix3.pt" in gone and "student_pruned.ft.pt" in gone and "student_kd.q8.z.npz" in gone
    assert all(".q8." in n or ".q4c." in n or ".mix3." in n or n.endswith((".qat.mix3.pt", ".ft.pt")) for n in gone)
    assert f"removed what the run this one replaces wrote and this one did not: {', '.join(gone)}\n" in proc.stdout
    assert {"frontier.png", "predictions.csv", "student_kd.pt", "student_pruned.pt"} <= left
    proc = run_script("03_prune.py", *run, "--prune_count=1", "--finetune_epochs=0")  # was 2 rounds
    assert proc.returncode == 0, proc.stderr
    assert sorted(before - {p.name for p in work.iterdir()}) == sorted(gone + ["student_pruned_0.640_global.pt"])
    assert "wrote and this one did not: student_pruned_0.640_global.pt\n" in proc.stdout
