"""Files: written through a temporary file and a rename, published together when a run
finishes, loaded without pickle; the results log; the teacher file and its note."""
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

from support.running import UserError, interrupted_inside, mark_published, say_last, signals_deferred

RESULTS = "results.json"
OUTPUTS = "outputs.json"  # {stage: the files its last run wrote}, for a rerun to remove what it no longer makes
TEACHER_FILE = "teacher_resnet18.bin"


# ---- writing ----------------------------------------------------------------------------------

def atomic_write(path, write):
    """Write through write(file) into a temporary file beside `path`, then rename it. A full
    disk or a vanished folder is one clear line, and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if interrupted_inside(e):  # Ctrl-C inside torch.save: an interruption, not a full disk
            raise KeyboardInterrupt from None
        reason = getattr(e, "strerror", None) or "the write failed; is the disk full?"
        raise UserError(f"{path}: could not be written ({reason}); it is as it was before") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path):
    import torch  # here, not above: predict.py runs this package without PyTorch
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(path, obj):
    text = json.dumps(obj, indent=1).encode()
    atomic_write(path, lambda f: f.write(text))


def new_path(path):
    """Where a run keeps a new output until it finishes: `<name>.new` beside `<name>`."""
    return Path(path).with_name(Path(path).name + ".new")


# The stages whose rows a new run of a stage leaves stale, beyond its own: those built on its
# output. 00 and 01 feed later stages only sometimes (teacher_changed, scratch_started).
BUILT_ON = {"0": "2345", "1": "2345", "2": "345", "3": "45", "4": "5"}


def stage_of(row):
    """The stage number of a results-log row, as a character ("4" for "4 quantization")."""
    return str(row.get("stage", ""))[:1]


def teacher_changed(rows, record):
    """Whether 00's `record` is about another teacher file (SHA-1) than the log's later rows were
    made with: the one 02 recorded, else the one the stage-0 row is about (for a row from before
    either recorded it, a teacher with other validation predictions); no such row, no change."""
    distilled = [r["teacher_sha1"] for r in rows if stage_of(r) == "2" and "teacher_sha1" in r]
    if distilled:
        return distilled[-1] != record["sha1"]
    old = [r for r in rows if stage_of(r) == "0"]
    key = "sha1" if old and "sha1" in old[-1] else "val_correct"
    return bool(old) and old[-1].get(key) != record.get(key)


def scratch_started(rows, record):
    """Whether a row of the log's student_kd started from 01's `record`'s model (02 --from_scratch=False)."""
    return any(stage_of(r) == "2" and r.get("start") == record["model"] for r in rows)


def made_stale(rows, record):
    """The stages of the log whose rows `record` leaves stale."""
    stage = stage_of(record)
    feeds_later = {"0": teacher_changed, "1": scratch_started}.get(stage)
    if feeds_later and not feeds_later(rows, record):
        return {stage}
    return set(stage + BUILT_ON.get(stage, ""))


def still_valid(rows, records):
    """The rows of the results log a run's records leave standing: not of the same model, not of
    the same stage (a round or file the new run no longer makes), not of a stage built on it."""
    names = {r["model"] for r in records}
    stale = set().union(*(made_stale(rows, r) for r in records))
    return [r for r in rows if r["model"] not in names and stage_of(r) not in stale]


def publish(ckpt_dir, outputs=(), records=(), finished=(), replaces_outputs=False):
    """The end of a completed run: each output's `.new` file replaces it, and the run's records
    replace the rows of the results log they make stale (still_valid()), together (Ctrl-C waits
    until both are done). `finished`: files of the run (resumable states) to remove afterwards.
    replaces_outputs: the run's outputs are recorded as its stage's (outputs.json), and what the
    stage's last run wrote and this one did not is removed (said in one line): a rerun with fewer
    rounds or files leaves none of the old ones beside the new, also when an earlier stage ran in
    between. The outputs of later stages this run leaves stale are named in one line. Returns the
    paths written."""
    ckpt_dir = Path(ckpt_dir)
    targets = [Path(p) for p in outputs] + [ckpt_dir / RESULTS]
    twice = sorted({p.name for p in targets if targets.count(p) > 1})
    if twice:
        raise UserError(f"{', '.join(twice)}: two outputs of this run share the name; nothing was replaced")
    old_rows, written = read_results(ckpt_dir), read_outputs(ckpt_dir)
    stage = stage_of(records[-1]) if records else ""
    superseded, swapped = [], list(targets)
    if replaces_outputs and stage:
        names = [p.name for p in targets[:-1]]
        superseded = [ckpt_dir / n for n in sorted(set(written.get(stage, [])) - set(names))]
        atomic_json(new_path(ckpt_dir / OUTPUTS), {**written, stage: names})
        swapped.append(ckpt_dir / OUTPUTS)
    atomic_json(new_path(ckpt_dir / RESULTS), still_valid(old_rows, records) + list(records))
    for path in swapped:  # what would stop a swap halfway is found first
        if path.is_dir() or not new_path(path).is_file():
            raise UserError(f"{path}: is a folder, or its new version is missing; nothing was replaced")
    with signals_deferred():
        for path in swapped:
            os.replace(new_path(path), path)
        mark_published()
    for path in finished:
        Path(path).unlink(missing_ok=True)
    remove_superseded([p for p in superseded if p.is_file()])
    later = sorted(set().union(*(made_stale(old_rows, r) for r in records)) - {stage}) if records else []
    say_stale([ckpt_dir / n for s in later for n in written.get(s, []) if (ckpt_dir / n).is_file()])
    return targets


def read_outputs(ckpt_dir):
    """{stage: the file names its last run wrote} (outputs.json; none, or a damaged one: {})."""
    try:
        written = json.loads((Path(ckpt_dir) / OUTPUTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(written, dict):
        return {}
    return {s: [n for n in names if isinstance(n, str) and Path(n).name == n]  # never a path outside ckpt_dir
            for s, names in written.items() if isinstance(names, list)}


def remove_superseded(paths):
    for path in paths:
        path.unlink()
    if paths:
        print(f"removed what the run this one replaces wrote and this one did not: {', '.join(p.name for p in paths)}")


def say_stale(paths):
    if paths:
        print(f"now stale, made from what this run replaced (rerun their stages): {', '.join(p.name for p in paths)}")


def say_written(paths):
    say_last("wrote " + ", ".join(str(p) for p in paths))


def ensure_writable(folder):
    """Fail now, not after an hour of training, if checkpoints or their log cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{folder}: cannot write checkpoints here ({e.strerror}); "
                        "choose another --ckpt_dir") from None
    read_results(folder)  # a damaged results log is said now, not after the run
    return folder


def read_results(ckpt_dir):
    """The results log: one record (a dict) per model, every stage's."""
    path = Path(ckpt_dir) / RESULTS
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
        raise UserError(f"{path}: damaged results log; delete it and rerun the stages")
    return rows


# ---- reading ----------------------------------------------------------------------------------

def require(path, made_by):
    """Fail before any work when a stage's input file is missing."""
    if not Path(path).exists():
        raise UserError(f"{path}: not found; run {made_by} first")


def torch_load(path, made_by=None):
    """torch.load with weights_only=True, every failure turned into one clear line."""
    path = Path(path)
    if not path.exists():
        hint = f"; run {made_by} first" if made_by else ""
        raise UserError(f"{path}: not found{hint}")
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"{path}: refused, it holds Python objects beyond weights and "
                            "loading it could run code") from None
        raise UserError(f"{path}: damaged or not a PyTorch file ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: damaged or not a PyTorch file ({msg})") from None


def file_sha1(path):
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    return h.hexdigest()


def teacher_sha1(path):
    """The key by which results-log rows name a teacher file: the start of its SHA-1."""
    return file_sha1(path)[:16]


def file_bytes(path):
    return Path(path).stat().st_size


def saved_bytes(obj):
    """The size of the file torch.save would write for obj."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


# ---- the teacher file and its note --------------------------------------------------------------

def teacher_note_path(ckpt_dir):
    return (Path(ckpt_dir) / TEACHER_FILE).with_suffix(".json")


def save_teacher(ckpt_dir, state_dict, norm, metrics):
    """The course's format (a plain state_dict) plus a JSON note of its preprocessing, both as
    `.new` files for publish(). Returns the two paths to publish."""
    path, note_path = Path(ckpt_dir) / TEACHER_FILE, teacher_note_path(ckpt_dir)
    atomic_torch_save(state_dict, new_path(path))
    atomic_json(new_path(note_path), {"norm": norm, "sha1": file_sha1(new_path(path)), **metrics})
    return [path, note_path]


def teacher_note(ckpt_dir):
    """The note 00_teacher.py wrote beside the teacher file, if it is there and still about that
    file (its SHA-1); else None. Read before any work, so a damaged note stops nothing late."""
    path, note_path = Path(ckpt_dir) / TEACHER_FILE, teacher_note_path(ckpt_dir)
    if not note_path.exists() or not path.exists():
        return None
    try:
        note = json.loads(note_path.read_text(encoding="utf-8"))
        norm, sha1 = note["norm"], note.get("sha1")
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{note_path}: damaged; delete it and give --teacher_norm") from None
    if norm not in ("imagenet", "none"):
        raise UserError(f"{note_path}: norm {norm!r} is neither imagenet nor none; fix or delete it")
    return note if sha1 == file_sha1(path) else None


def teacher_norm_of(ckpt_dir, teacher_norm):
    """The teacher's input normalisation: its note's, else the teacher_norm setting."""
    note = teacher_note(ckpt_dir)
    return note["norm"] if note else teacher_norm
