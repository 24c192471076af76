"""Compare runs: edit a constant, run the stages into another folder, compare.

One run: its table, as 04_quantize.py ends (teacher, scratch, distilled, pruned, final, each
against the row before). Two or more: each stage every run has, each run against the same stage
of the first, paired on the same validation images. --seeds: runs that differ only in seed, per
stage the mean and range over runs and, pooling every run's images, each stage against the row
before. These read only what the runs wrote (results.json, student_kd.pt's preprocessing).
--models: files scored on validation (needs --data_dir), each against the first and against the
teacher beside the first.

    python compare.py checkpoints/food101
    python compare.py checkpoints/food101 checkpoints/food101-T8
    python compare.py --seeds checkpoints/s0 checkpoints/s1 checkpoints/s2
    python compare.py --data_dir=data/food-11 --models=checkpoints/a/student_kd.pt,checkpoints/b/student_kd.pt
"""
import sys
from pathlib import Path

import common  # first: Ctrl-C during the slow imports is then a clean exit
import numpy as np

from support import files, reports
from support.running import UserError, run
from support.settings import configure, describe_preprocess, parse_list, pick_device
from support.stats import Score

# --- settings (each can be overridden as --name=value; runs can also be given as arguments) --
runs = ""  # run folders (each a ckpt_dir with its results.json), comma-separated; the first is the reference
seeds = False  # the runs differ only in seed: per stage mean, min-max and the pooled paired difference
other_preprocessing = False  # compare runs whose models saw other crops (another img_size, resize or norm)
models = ""  # files to score on validation, comma-separated (.pt or .npz); needs data_dir
data_dir = ""  # with --models: the data set the models were trained on
img_size = 112  # with --models: only for a model that records no preprocessing
resize = 0
teacher_norm = "none"  # the teacher file's input normalisation, if neither its note nor a distilled student records it
select_fraction = 0.1  # as the models were trained with (the validation split does not depend on it)
batch_size = 128
cache_dir = "data/cache"
device = "auto"

AGAINST_FIRST = "against the first run [95% CI]"
POOLED = "against the row before, pooled [95% CI]"


# ============================================================================================
# Runs: what their results logs hold
# ============================================================================================

def read_run(folder):
    """{row name: record} of a run's five models (reports.stage_records); one line if it has none."""
    rows = files.read_results(folder)
    if not rows:
        raise UserError(f"{Path(folder) / files.RESULTS}: not found or empty; give the ckpt_dir of a finished run")
    records = reports.stage_records(rows)
    if not records:
        raise UserError(f"{Path(folder) / files.RESULTS}: no teacher, student or final file recorded")
    return records


def validation_of(records):
    """The validation images a run was scored on: {(files key, images)} of its rows."""
    return {(r.get("val_key"), r.get("val_n")) for r in records.values()}


def check_same_images(runs_read):
    first, *others = runs_read
    for folder in others:
        if validation_of(runs_read[folder]) != validation_of(runs_read[first]):
            said = [", ".join(f"key {k}, {n} images" for k, n in sorted(validation_of(runs_read[f]), key=str))
                    for f in (folder, first)]
            raise UserError(f"{folder}: scored on other validation images than {first} ({said[0]}; {said[1]})")


def preprocessing_of(folder, cfg):
    """A run's preprocessing, in words, as its student_kd.pt records it."""
    path = Path(folder) / "student_kd.pt"
    return describe_preprocess(common.load_model(path)[1], cfg) if path.exists() else "no student_kd.pt"


def describe_runs(runs_read, cfg):
    lines = []
    for folder, records in runs_read.items():
        seed = records.get("distilled", {}).get("seed")
        final = records.get("final", {}).get("file")
        lines.append(f"  {folder}: {preprocessing_of(folder, cfg)}" + (f"; seed {seed}" if seed is not None else "")
                     + (f"; final file {final}" if final else ""))
    return "\n".join(lines)


def shared_stages(runs_read):
    stages = [s for s, *_ in reports.STAGES if all(s in records for records in runs_read.values())]
    if not stages:
        raise UserError("no model is recorded in every run; nothing to compare")
    return stages


def print_runs(runs_read, cfg):
    """Each stage every run has, each run against the same stage of the first."""
    first = next(iter(runs_read))
    table = []
    for stage in shared_stages(runs_read):
        reference = reports.recorded_score(runs_read[first][stage])
        for folder, records in runs_read.items():
            r = records[stage]
            score = reports.recorded_score(r)
            table.append({"model": f"{stage} ({r['file']})", "run": folder, "params": r.get("params"),
                          "bytes": r.get("bytes"), reports.VAL_COLUMN: score or r.get("val_acc"),
                          **(reports.paired_cells(reference, score, AGAINST_FIRST) if folder != first else {})})
    n = next(iter(validation_of(runs_read[first])))[1]
    print(f"runs: each against the same stage of {first}, paired on the same {n} "
          "validation images (bootstrap 95% CI, exact McNemar p)")
    print(describe_runs(runs_read, cfg))
    print(reports.markdown_table(table, ["model", "run", "params", "bytes", reports.VAL_COLUMN, AGAINST_FIRST,
                                         "McNemar p"]))


# ============================================================================================
# Seeds: the spread over runs, and the differences pooled over every run's images
# ============================================================================================

def pooled(scores):
    """One Score of every run's images, one after another (the runs share their images)."""
    return Score(np.concatenate([s.correct for s in scores]), key=f"{scores[0].key} x{len(scores)}")


def check_same_preprocessing(runs_read, cfg, allow):
    """Runs whose models saw other crops are compared only when the user says so."""
    made = {folder: preprocessing_of(folder, cfg) for folder in runs_read}
    first = next(iter(made))
    for folder, said in made.items():
        if said != made[first] and not allow:
            raise UserError(f"{folder} was made with other preprocessing than {first} ({said}; {made[first]}); "
                            "give --other_preprocessing=True to compare them all the same")


def check_only_seeds(runs_read, cfg):
    """--seeds: two or more runs of the same preprocessing, each of its own seed (a run given
    twice would pool the same outcomes twice, and narrow the intervals for nothing)."""
    seeds = [records.get("distilled", {}).get("seed") for records in runs_read.values()]
    if len(seeds) < 2 or None in seeds or len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds needs two or more runs of different seeds (their student_kd records: {seeds})")
    check_same_preprocessing(runs_read, cfg, allow=False)


def print_seeds(runs_read, cfg):
    """Per stage: mean accuracy, min-max over runs, and against the row before, pooled."""
    check_only_seeds(runs_read, cfg)
    stages = shared_stages(runs_read)
    scores = {s: [reports.recorded_score(records[s]) for records in runs_read.values()] for s in stages}
    if any(x is None for xs in scores.values() for x in xs):
        raise UserError("--seeds: a run's results.json holds no per-image outcome for a model; rerun its stages")
    table, before = [], None
    for stage in stages:
        accs = [s.acc for s in scores[stage]]
        table.append({"model": stage, "mean val acc": f"{np.mean(accs):.4f}",
                      "min-max": f"{min(accs):.4f}-{max(accs):.4f}",
                      **reports.paired_cells(before, pooled(scores[stage]), POOLED)})
        before = pooled(scores[stage])
    if {"teacher", "final"} <= set(stages):
        table.append({"model": "final - teacher",
                      **reports.paired_cells(pooled(scores["teacher"]), pooled(scores["final"]), POOLED)})
    n = scores[stages[0]][0].n
    print(f"{len(runs_read)} runs that differ only in seed; pooled: {len(runs_read)} x {n} = "
          f"{len(runs_read) * n:,} paired images (bootstrap 95% CI, exact McNemar p)")
    print(describe_runs(runs_read, cfg))
    print(reports.markdown_table(table, ["model", "mean val acc", "min-max", POOLED, "McNemar p"]))


# ============================================================================================
# Files: scored on validation, each against the first and the teacher (docs/study.py uses these)
# ============================================================================================

def paired_text(a, b):
    cells = reports.paired_cells(a, b, "d")
    return f"{cells['d']}, p {cells['McNemar p']}"


def scoring(cfg, students):
    """(score, the teacher's validation Score): score(model, preprocess) is a validation Score;
    the teacher is the file beside the students, which must share it."""
    teachers = {files.file_sha1(Path(p).parent / files.TEACHER_FILE) for p in students}
    if len(teachers) != 1:
        raise UserError("the models were distilled from different teacher files (or one has none beside it)")
    data = common.data_for(cfg, splits=("training", "validation"))
    score = common.Scorer(data, cfg, pick_device(cfg.device))
    recorded = (common.load_model(p, "student")[2].get("teacher_norm") for p in students)  # 02's students record it
    norm = next((n for n in recorded if n), cfg.teacher_norm)
    teacher, norm = common.load_teacher(Path(students[0]).parent, data.num_classes, norm)
    teacher_val = score(teacher, {"norm": norm})
    print(f"teacher: val acc {teacher_val}; {teacher_val.n} validation images\n")
    return score, teacher_val


def score_file(score, path):
    return score(*common.load_model(path, "student")[:2])


def print_models(paths, cfg):
    for path in paths:
        files.require(path, "02_distill.py")
    score, teacher_val = scoring(cfg, paths)
    scores = [score_file(score, p) for p in paths]
    rows = [{"model": str(p), reports.VAL_COLUMN: s, "minus the first": paired_text(scores[0], s) if i else "",
             "minus the teacher": paired_text(teacher_val, s)} for i, (p, s) in enumerate(zip(paths, scores))]
    print(reports.markdown_table(rows, list(rows[0])))


def main():
    args = ["--seeds=True" if a == "--seeds" else a for a in sys.argv[1:]]  # a bare flag reads as a flag should
    cfg = configure(globals(), [a for a in args if a.startswith("-")])
    folders = [a for a in args if not a.startswith("-")] + parse_list(cfg.runs, "runs", allow_empty=True)
    if bool(folders) == bool(cfg.models) or (cfg.models and not cfg.data_dir):
        raise UserError("give run folders (python compare.py RUN [RUN ...]) or --data_dir=PATH --models=A,B,...")
    if cfg.models:
        return print_models([Path(p) for p in parse_list(cfg.models, "models")], cfg)
    if len({Path(f).resolve() for f in folders}) < len(folders):
        raise UserError(f"{', '.join(folders)}: a run is given twice")
    runs_read = {folder: read_run(folder) for folder in folders}
    check_same_images(runs_read)
    if cfg.seeds:
        print_seeds(runs_read, cfg)
        return
    check_same_preprocessing(runs_read, cfg, cfg.other_preprocessing)
    if len(folders) == 1:
        print(reports.run_table_text(files.read_results(folders[0])))
    else:
        print_runs(runs_read, cfg)


if __name__ == "__main__":
    run(main)
