"""Reports: tables (aligned, or Markdown to paste), the rows that compare two models, the records
of the results log, the table of every stage and the run's table (the five models a reader wants,
each against the row before), the course's predictions file."""
import csv
import io
import re
from pathlib import Path

from support import files
from support.running import warn
from support.stats import Score, paired

VAL_COLUMN = "val acc [95% CI]"
COLUMNS = ("stage", "model", "params", "bytes", "macs", VAL_COLUMN)


def cell(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return ""
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_table(rows, columns=COLUMNS):
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def markdown_table(rows, columns):
    """A table to paste into Markdown: | cells |, columns of whole numbers right-aligned."""
    whole = [all(isinstance(r.get(c), int) or r.get(c) in (None, "") for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if w else "---" for w in whole) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def difference_text(d):
    lo, hi = d["ci"]
    return f"{d['diff']:+.4f} [{lo:+.3f}, {hi:+.3f}]"


def paired_row(name_a, a, name_b, b):
    """A table row: how model b differs from model a on the same validation images."""
    d = paired(a, b)
    return {"comparison": f"{name_b} - {name_a}", "difference [95% CI]": difference_text(d),
            "McNemar p": f"{d['p']:.3g}", "right only before / after": f"{d['only_a']} / {d['only_b']}"}


def paired_cells(a, b, column):
    """b against a as two cells, `column` (the difference [95% CI]) and McNemar p; none where
    either has no per-image outcome or the two were scored on other images."""
    if a is None or b is None or a.key != b.key or a.n != b.n:
        return {}
    d = paired(a, b)
    return {column: difference_text(d), "McNemar p": f"{d['p']:.3g}"}


def score_fields(val):
    """A validation Score as results-log fields: accuracy, interval and every image's outcome."""
    lo, hi = val.interval()
    return {"val_acc": round(val.acc, 4), "val_ci": [round(lo, 4), round(hi, 4)], "val_n": val.n,
            "val_key": val.key, "val_correct": val.to_text()}


def recorded_score(record):
    """The validation Score a results record holds (None for a record without one)."""
    try:
        return Score.from_text(record["val_correct"], record["val_n"], record.get("val_key"))
    except (KeyError, ValueError, TypeError):  # an old or hand-edited record: no per-image outcome
        return None


def recorded_val(rows, model, key):
    """The validation Score the results log holds for `model`, if it was scored on the images of
    `key` (those of this run), else None."""
    scores = [recorded_score(r) for r in rows if r.get("model") == model]
    return next((s for s in scores if s is not None and s.key == key), None)


def submission_ids(names):
    """The course's Id of each test file, its number (0000.jpg -> 0); None when the files are
    not all named by number (ASCII digits), or two share a number (1.jpg, 0001.png)."""
    stems = [Path(n).stem for n in names]
    if not stems or not all(re.fullmatch(r"[0-9]+", s) for s in stems):
        return None
    ids = [int(s) for s in stems]
    return ids if len(set(ids)) == len(ids) else None


def write_predictions(path, split, preds, unreadable_class=0, class_names=None):
    """The course's submission, Id,Category in Id order, where the files are named by number;
    otherwise File,Category in name order. With `class_names`, a Name column. An unreadable
    image's row says `unreadable_class` (the course's submission wants a class in every row),
    or nothing when that is None. Returns (rows, rows of unreadable images)."""
    bad = set(split.unreadable)
    for name in split.unreadable:
        warn(f"{name}: not a readable image; its row in {Path(path).name.removesuffix('.new')} says "
             + ("nothing" if unreadable_class is None else f"class {unreadable_class}"))
    no_answer = "" if unreadable_class is None else unreadable_class
    answers = [no_answer if name in bad else c for name, c in zip(split.names, preds.tolist())]
    ids = submission_ids(split.names)
    rows = sorted(map(list, zip(ids or split.names, answers)), key=lambda row: row[0])
    header = ["Id" if ids else "File", "Category"]
    if class_names:
        header.append("Name")
        rows = [[key, c, "" if c == "" else class_names[c]] for key, c in rows]

    def write(f):
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *rows])
        f.write(text.getvalue().encode())
    files.atomic_write(path, write)
    return len(rows), len(bad)


def print_summary(ckpt_dir, chosen_on, val_images):
    """Every stage's record, then each stage against the one before on the same images."""
    records = files.read_results(ckpt_dir)
    rows = [{**r, VAL_COLUMN: recorded_score(r) or r.get("val_acc")}
            for r in sorted(records, key=lambda r: str(r.get("stage"))) if r["model"] != "final"]
    print(f"\nevery stage ({Path(ckpt_dir) / files.RESULTS}; validation reports, {chosen_on} chose)")
    print(format_table(rows, ["stage", "model", "params", "bytes", "bytes_zip", "macs", VAL_COLUMN]))
    by_name = {r["model"]: r for r in records}
    final_name = f"final file ({by_name.get('final', {}).get('file', '?')})"
    source = by_name.get("final", {}).get("from", "student_pruned")  # the checkpoint the final file encodes
    steps = dict.fromkeys([("student_scratch", "student_kd"), ("student_kd", "student_pruned"), (source, "final"),
                           ("student_kd", "final")])  # the last: what the whole of compression cost
    pairs = []
    for a, b in steps:
        sa, sb = (recorded_score(by_name[m]) if m in by_name else None for m in (a, b))
        if sa is None or sb is None or sa.key != sb.key or sa.n != sb.n:
            continue  # a stage not run, or scored on other images
        pairs.append(paired_row(a, sa, final_name if b == "final" else b, sb))
    if pairs:
        print(f"\neach stage against the one before, and the final file against student_kd, on the same "
              f"{val_images} validation images (paired bootstrap interval, exact McNemar test)")
        print(format_table(pairs, list(pairs[0])))


# ---- the run's table: the five models a reader wants, each against the row before ---------------

# (row name, results-log model, its file; the final row's file is the one its record names)
STAGES = (("teacher", "teacher_resnet18", files.TEACHER_FILE), ("scratch", "student_scratch", "student_scratch.pt"),
          ("distilled", "student_kd", "student_kd.pt"), ("pruned", "student_pruned", "student_pruned.pt"),
          ("final", "final", None))
AGAINST_BEFORE = "against the row before [95% CI]"
RUN_COLUMNS = ("model", "params", "bytes", VAL_COLUMN, AGAINST_BEFORE, "McNemar p")


def model_of_file(name):
    """The results-log model a file is (student_pruned.mix3.z.npz -> student_pruned.mix3)."""
    return name.removesuffix(".z.npz").removesuffix(".npz").removesuffix(".pt")


def stage_records(rows):
    """{row name: record} of the five models a run has, in order; the final record with its file
    name and the params of the model that file is."""
    by_model = {r["model"]: r for r in rows}
    found = {}
    for stage, model, file in STAGES:
        if model in by_model:
            found[stage] = {"file": file, **by_model[model]}
    if "final" in found:
        found["final"]["params"] = by_model.get(model_of_file(found["final"]["file"]), {}).get("params")
    return found


def run_heading(records):
    """The one line above a run's table: the validation images it was scored on, and what chose."""
    n = next((r["val_n"] for r in records.values() if "val_n" in r), "?")
    chosen = next((r["chosen_on"] for r in reversed(records.values()) if "chosen_on" in r), None)
    return (f"the run: each model against the row before, paired on the same {n} validation images (bootstrap "
            f"95% CI, exact McNemar p)" + (f"; models chosen on {chosen}" if chosen else ""))


def run_table(rows):
    """A run's table, from its results-log rows: teacher, scratch, distilled, pruned, final (those it
    has), each against the row before, then the final file against the teacher."""
    records = stage_records(rows)
    table, before = [], None
    for stage, r in records.items():
        score = recorded_score(r)
        table.append({"model": f"{stage} ({r['file']})", "params": r.get("params"), "bytes": r.get("bytes"),
                      VAL_COLUMN: score or r.get("val_acc"), **paired_cells(before, score, AGAINST_BEFORE)})
        before = score
    if {"teacher", "final"} <= set(records):
        scores = [recorded_score(records[s]) for s in ("teacher", "final")]
        table.append({"model": "final - teacher", **paired_cells(*scores, AGAINST_BEFORE)})
    return table


def run_table_text(rows):
    """The run's table under its heading, as 04 ends and `compare.py RUN` prints it."""
    return run_heading(stage_records(rows)) + "\n" + markdown_table(run_table(rows), RUN_COLUMNS)


def print_files(rows, final, val_images, select_images):
    """04's table of every file, smallest first, the final one marked."""
    table = [{"file": r["path"].name, "bytes": r["bytes"], VAL_COLUMN: r["val"], "selection acc [95% CI]": r["select"],
              "select loss": round(r["select"].loss, 4), "front": r["front"], "final": "<-" if r is final else ""}
             for r in sorted(rows, key=lambda r: r["bytes"])]
    print(f"\nevery file, smallest first (accuracy after decoding, fp32; validation {val_images} images, selection "
          f"{select_images}; front: no smaller file is as accurate on validation)")
    print(format_table(table, list(table[0])))


def print_qat_gain(rows, qat_paths):
    """What QAT bought, on the same validation images: each QAT file against post-training
    quantization of the same model and layout, and against the control (the same epochs in float,
    then post-training quantization: training through the codes apart from training longer)."""
    by = {(r["model"], r["variant"]): r["val"] for r in rows}
    pairs = [paired_row(f"{name}{kind}.{v}{note}", by[f"{name}{kind}", v], f"{name}.qat.{v}", by[f"{name}.qat", v])
             for name, v in qat_paths if v
             for kind, note in (("", " (post-training)"), (".ft", " (float fine-tune, post-training)"))]
    if pairs:
        print("\nquantization-aware fine-tuning against post-training quantization, same model and bits")
        print(format_table(pairs, list(pairs[0])))


def pareto(rows):
    """Marks rows that no other row beats: at most as many bytes and at least as accurate
    (validation), better in one."""
    for r in rows:
        r["front"] = "*" if not any(o["bytes"] <= r["bytes"] and o["val"].acc >= r["val"].acc
                                    and (o["bytes"], o["val"].acc) != (r["bytes"], r["val"].acc)
                                    for o in rows) else ""
    return rows
