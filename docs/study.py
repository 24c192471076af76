"""Studies of the distillation recipe (docs/results.md): models compared on the same
validation images, paired, each against the first and against the teacher.

--models=A,B,...: student files; a table of each one's accuracy, minus A's and minus the
teacher's (the teacher file beside A).
--prefix=P: the patience study. Every folder PE (E = the epochs) that holds student_kd.pt (02
--epochs=E) and, where present, student_scratch.pt (01 --epochs=E); a table per E and a plot of
validation accuracy against epochs (docs/epochs.png).

    python docs/study.py --data_dir=../shared/data/food101-10 --models=checkpoints/a/student_kd.pt,checkpoints/b/student_kd.pt
    python docs/study.py --data_dir=../shared/data/food101-10 --prefix=checkpoints/ep
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (after the repository joins the path)
from support import files, plots, reports  # noqa: E402
from support.running import UserError, run  # noqa: E402
from support.settings import configure, pick_device  # noqa: E402

models = ""  # student files to compare, comma-separated
prefix = ""  # the patience study's folders: <prefix>10, <prefix>20, ...
data_dir = ""  # the data set the models were trained on (required)
img_size = 112  # only for a model that records no preprocessing
resize = 0
teacher_norm = "none"  # the teacher file's input normalisation, if neither its note nor a distilled student records it
select_fraction = 0.1  # as the models were trained with (the validation split does not depend on it)
batch_size = 128
cache_dir = "data/cache"
device = "auto"
plot = "docs/epochs.png"  # "" draws nothing


def study_folders(prefix):
    """{epochs: folder} of the folders <prefix>E that hold a student_kd.pt."""
    base = Path(prefix)
    found = {}
    for folder in base.parent.glob(base.name + "*"):
        match = re.fullmatch(re.escape(base.name) + r"(\d+)", folder.name)
        if match and (folder / "student_kd.pt").exists():
            found[int(match.group(1))] = folder
    if not found:
        raise UserError(f"no folder {prefix}E holds a student_kd.pt (E = the epochs it trained)")
    return dict(sorted(found.items()))


def paired_text(a_name, a, b_name, b):
    row = reports.paired_row(a_name, a, b_name, b)
    return f"{row['difference [95% CI]']}, p {row['McNemar p']}"


def compare_models(paths, score, teacher_val):
    scores = [score(*common.load_model(p, "student")[:2]) for p in paths]
    rows = [{"model": str(p), "val acc [95% CI]": s,
             "minus the first": paired_text("a", scores[0], "b", s) if i else "",
             "minus the teacher": paired_text("t", teacher_val, "b", s)} for i, (p, s) in enumerate(zip(paths, scores))]
    print(reports.format_table(rows, list(rows[0])))


def patience(folders, score, teacher_val, plot):
    rows, curves = [], {"distilled student": [], "student from scratch": []}
    for epochs, folder in folders.items():
        kd = score(*common.load_model(folder / "student_kd.pt", "student")[:2])
        row = {"epochs": epochs, "distilled": kd, "distilled - teacher": paired_text("t", teacher_val, "d", kd)}
        curves["distilled student"].append((epochs, kd.acc, kd.interval()))
        if (folder / "student_scratch.pt").exists():
            scratch = score(*common.load_model(folder / "student_scratch.pt", "student")[:2])
            row |= {"scratch": scratch, "distilled - scratch": paired_text("s", scratch, "d", kd)}
            curves["student from scratch"].append((epochs, scratch.acc, scratch.interval()))
        rows.append(row)
    columns = ["epochs", "scratch", "distilled", "distilled - scratch", "distilled - teacher"]
    print(reports.format_table([{c: r.get(c, "") for c in columns} for r in rows], columns))
    if plot:
        plots.plot_epochs(Path(plot), {k: v for k, v in curves.items() if v}, teacher_val.acc)
        print(f"wrote {plot}")


def main():
    cfg = configure(globals())
    if not cfg.data_dir or bool(cfg.models) == bool(cfg.prefix):
        raise UserError("give --data_dir=PATH (the models' data set) and one of --models=A,B,... or --prefix=P")
    paths = [Path(p) for p in cfg.models.split(",")] if cfg.models else []
    folders = study_folders(cfg.prefix) if cfg.prefix else {}
    for path in paths:
        files.require(path, "02_distill.py")
    students = paths or [f / "student_kd.pt" for f in folders.values()]
    teachers = {files.file_sha1(p.parent / files.TEACHER_FILE) for p in students}
    if len(teachers) != 1:
        raise UserError("the models were distilled from different teacher files (or one has none beside it)")
    data = common.data_for(cfg, splits=("training", "validation"))
    score = common.Scorer(data, cfg, pick_device(cfg.device))
    recorded = (common.load_model(p, "student")[2].get("teacher_norm") for p in students)  # 02's students record it
    norm = next((n for n in recorded if n), cfg.teacher_norm)
    teacher, norm = common.load_teacher(students[0].parent, data.num_classes, norm)
    teacher_val = score(teacher, {"norm": norm})
    print(f"teacher: val acc {teacher_val}; {teacher_val.n} validation images\n")
    if paths:
        compare_models(paths, score, teacher_val)
    else:
        patience(folders, score, teacher_val, cfg.plot)


if __name__ == "__main__":
    run(main)
