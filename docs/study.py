"""The patience study (docs/results.md): distilled and scratch students trained for more and
more epochs, compared on the same validation images, paired, with each other and with the
teacher; scored as compare.py --models scores files.

Every folder PE (E = the epochs) that holds student_kd.pt (02 --epochs=E) and, where present,
student_scratch.pt (01 --epochs=E): a table per E and a plot of validation accuracy against
epochs (docs/epochs.png). --models=A,B,... is compare.py --models (each file against the first and
the teacher), kept here for the commands docs/results.md records.

    python docs/study.py --data_dir=../shared/data/food101-10 --prefix=checkpoints/ep
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare  # noqa: E402  (after the repository joins the path)
from support import plots, reports  # noqa: E402
from support.running import UserError, run  # noqa: E402
from support.settings import configure, parse_list  # noqa: E402

prefix = ""  # the patience study's folders: <prefix>10, <prefix>20, ...
models = ""  # or files to compare, comma-separated, as compare.py --models does
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


def patience(folders, score, teacher_val, plot):
    rows, curves = [], {"distilled student": [], "student from scratch": []}
    for epochs, folder in folders.items():
        kd = compare.score_file(score, folder / "student_kd.pt")
        row = {"epochs": epochs, "distilled": kd, "distilled - teacher": compare.paired_text(teacher_val, kd)}
        curves["distilled student"].append((epochs, kd.acc, kd.interval()))
        if (folder / "student_scratch.pt").exists():
            scratch = compare.score_file(score, folder / "student_scratch.pt")
            row |= {"scratch": scratch, "distilled - scratch": compare.paired_text(scratch, kd)}
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
    if cfg.models:
        return compare.print_models([Path(p) for p in parse_list(cfg.models, "models")], cfg)
    folders = study_folders(cfg.prefix)
    score, teacher_val = compare.scoring(cfg, [f / "student_kd.pt" for f in folders.values()])
    patience(folders, score, teacher_val, cfg.plot)


if __name__ == "__main__":
    run(main)
