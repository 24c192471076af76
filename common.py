"""Shared pieces of the food-compress stages: settings, data, models, loops, checkpoints.

Every stage script keeps its settings as plain constants at its top and calls `run(main)`;
everything they have in common lives here, once.
"""
import os
import signal
import sys

# Ctrl-C (or a kill's SIGTERM) while the heavy modules below load (a second or more) ends the
# run quietly: nothing has been written yet. run() takes over once they are loaded.
for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, lambda *_: (sys.stderr.write("\ninterrupted while starting; nothing was written\n"),
                                    os._exit(130)))

import hashlib
import io
import json
import math
import pickle
import re
import time
import zipfile
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

for _sig in (signal.SIGINT, signal.SIGTERM):  # from here on both are a KeyboardInterrupt
    signal.signal(_sig, signal.default_int_handler)

REPO = Path(__file__).resolve().parent
FOOD11_CLASSES = ["Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles/Pasta", "Rice", "Seafood", "Soup", "Vegetable/Fruit"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
NATIVE = -1  # resize=-1: images keep their pixels (the scale the course's files were trained at)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STUDENT_NORM = "imagenet"  # how our students' inputs are normalised (recorded in their checkpoints)
DEFAULT_DATA_DIR = "data/food-11"
SAMPLE_DIR = "data/sample"
# recipe="course": the homework's choices (the seed code's dataset.py, the TA's notebook), for
# whichever of these settings a script has and the command line does not give.
COURSE_RECIPE = {"img_size": 256, "resize": NATIVE, "rotate": 15.0, "jitter": 0.0, "norm": "none",
                 "lr": 1e-3, "schedule": "constant", "weight_decay": 0.01, "label_smoothing": 0.0,
                 "batch_size": 32, "temperature": 20.0, "alpha": 0.5, "prune_count": 5, "prune_rate": 0.95,
                 "finetune_epochs": 5, "prune_groups": "4,5,6,7", "method": "uniform", "sparsity": 0.0,
                 "sparsity_epochs": 0, "variants": "fp16,q8", "qat_variants": ""}
# Sizes that let the whole pipeline run on the generated sample in a few CPU minutes.
SAMPLE_SETTINGS = {"img_size": 32, "resize": 36, "batch_size": 32, "epochs": 6,
                   "finetune_epochs": 2, "ckpt_dir": "checkpoints/sample"}


# ============================================================================================
# Errors and the script runner
# ============================================================================================

class UserError(Exception):
    """A problem the user can fix: printed as one line, exit code 2, no traceback."""


class Interrupted(Exception):
    """Ctrl-C, after the resumable state has been left in a clean place: exit code 130."""


def run(main):
    """Run a stage's main(): user errors become one line on stderr, Ctrl-C exits 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"\ninterrupted: {str(e) or 'the previous outputs are as they were'}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


# ============================================================================================
# Settings: the lowercase constants at the top of a script, each overridable as --name=value
# ============================================================================================

# Allowed ranges, for whichever of these names a script has.
CHECKS = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "finetune_epochs": (lambda v: v >= 0, "at least 0"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "img_size": (lambda v: v >= 16, "at least 16 (the student halves it four times)"),
    "resize": (lambda v: v >= 0 or v == NATIVE, "0 (= img_size * 8/7), a size in pixels, or -1 (native scale)"),
    "lr": (lambda v: v > 0, "greater than 0"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "temperature": (lambda v: v > 0, "greater than 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "prune_rate": (lambda v: 0 < v < 1, "in (0, 1)"),
    "prune_count": (lambda v: v >= 1, "at least 1"),
    "max_acc_drop": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "sparsity": (lambda v: v >= 0, "at least 0"),
    "rotate": (lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
    "jitter": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "device": (lambda v: v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v) is not None,
               "auto, cpu, cuda, cuda:N or mps"),
    "teacher_norm": (lambda v: v in ("imagenet", "none"), "imagenet or none"),
    "select_fraction": (lambda v: 0 <= v < 1, "in [0, 1); 0 chooses on validation (optimistic)"),
    "method": (lambda v: v in ("uniform", "global"), "uniform or global"),
    "teacher_views": (lambda v: v >= 0, "at least 0 (0 = as many as the epochs)"),
    "qat_epochs": (lambda v: v >= 1, "at least 1"),
    "qat_lr": (lambda v: v > 0, "greater than 0"),
    "recipe": (lambda v: v in ("ours", "course"), "ours or course"),
    "schedule": (lambda v: v in ("onecycle", "constant"), "onecycle or constant"),
    "norm": (lambda v: v in ("imagenet", "none"), "imagenet or none"),
}


def settings_of(namespace):
    """The settings of a script: its lowercase constants of a plain type, in order."""
    return {k: v for k, v in namespace.items()
            if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str)}


def parse_value(name, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{name} takes True or False, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        what = {int: "a whole number", float: "a number"}[kind]
        raise UserError(f"--{name} takes {what}, got {text!r}") from None


def setting_help(script_path):
    """name -> comment, read from the `name = value  # comment` lines of a script."""
    text = Path(script_path).read_text(encoding="utf-8")
    return dict(re.findall(r"^([a-z_0-9]+) = .*?  # (.*)$", text, flags=re.M))


def configure(namespace, argv=None):
    """Apply --name=value overrides to a script's settings and check them.

    Returns a namespace of the final settings. When data_dir is left at its default and that
    folder does not exist, a small generated sample is used instead (with sample-sized
    settings for whatever was not given on the command line), and a notice says so.
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = settings_of(namespace)
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(namespace.get("__file__", sys.argv[0]), cfg)
            sys.exit(0)
        m = re.fullmatch(r"--([A-Za-z_0-9]+)=(.*)", arg, flags=re.S)
        if not m:
            raise UserError(f"arguments take the form --name=value, got {arg!r}; "
                            f"settings: {', '.join(cfg)}")
        name, text = m.groups()
        if name not in cfg:
            raise UserError(f"unknown setting --{name}; settings: {', '.join(cfg)}")
        given[name] = parse_value(name, text, cfg[name])
    if given.get("recipe", cfg.get("recipe")) == "course":
        cfg.update({k: v for k, v in COURSE_RECIPE.items() if k in cfg})
    cfg.update(given)
    for name, value in cfg.items():
        check = CHECKS.get(name)
        if check and not check[0](value):
            raise UserError(f"--{name}={value} is out of range: it must be {check[1]}")
    if "device" in cfg:
        pick_device(cfg["device"])  # a missing GPU is said now, not after the first stage of work
    notice = ""
    if cfg.get("data_dir") == DEFAULT_DATA_DIR and "data_dir" not in given \
            and not (REPO / DEFAULT_DATA_DIR).is_dir():
        notice = use_sample(cfg, given)
    for name in ("data_dir", "ckpt_dir", "cache_dir"):
        if cfg.get(name):  # a path typed by the user is taken from where they are
            cfg[name] = str(resolve(cfg[name], Path.cwd() if name in given else REPO))
    return Settings(cfg, given=given, notice=notice)


def use_sample(cfg, given):
    """No Food-11 and no --data_dir: the generated sample (made by data_for), with sample-sized
    settings for whatever was not given. Returns the one-line notice data_for prints."""
    cfg["data_dir"] = SAMPLE_DIR
    sample = {k: v for k, v in SAMPLE_SETTINGS.items() if k in cfg and k not in given}
    cfg.update(sample)
    return (f"notice: no {DEFAULT_DATA_DIR}, so a generated sample with "
            + ", ".join(f"{k}={v}" for k, v in sample.items()) + " (--data_dir=PATH for real data)")


class Settings(dict):
    """A dict whose keys read as attributes (cfg.epochs) and that knows which were given."""
    __getattr__ = dict.__getitem__

    def __setattr__(self, name, value):  # cfg.epochs = 3 sets the setting that cfg.epochs reads
        if name in self:
            self[name] = value
        else:
            super().__setattr__(name, value)

    def __init__(self, values, given=(), notice=""):
        super().__init__(values)
        self.given, self.notice, self.derived = set(given), notice, set()

    def but(self, **changes):
        """A copy with some values changed by the stage itself (`derived`, not the user's)."""
        copy = Settings({**self, **changes}, self.given, self.notice)
        copy.derived = set(changes)
        return copy


def adopt_recorded(cfg, record, source, names=("img_size", "resize", "select_fraction")):
    """Settings a checkpoint recorded win over the script's defaults, not over the command line:
    a given value that differs from the record is used, and one line says so."""
    for name in names:
        if name not in cfg or record.get(name) is None:
            continue
        if name in cfg.given:
            if cfg[name] != record[name] and not (name == "resize" and resize_of(cfg) == record[name]):
                print(f"note: {source} was made with {name}={record[name]}; using --{name}={cfg[name]} as given")
        elif not (name == "resize" and "img_size" in cfg.given and record[name] != NATIVE):
            # a new crop size brings its own resize; native scale is no size, so it stays
            cfg[name] = record[name]
    return cfg


def resolve(path, base):
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def print_help(script_path, cfg):
    notes = setting_help(script_path)
    print(f"usage: python {Path(script_path).name} [--name=value ...]\n\nsettings:")
    for name, value in cfg.items():
        print(f"  --{name}={value!r:<24} {notes.get(name, '')}")


# ============================================================================================
# Data: decode once, hold each split as one uint8 tensor, cache it on disk
# ============================================================================================

@dataclass
class Split:
    images: torch.Tensor   # N x S x S x 3 uint8 (RGB)
    labels: torch.Tensor   # N int64; -1 where unlabeled (testing)
    names: list            # file names, same order
    unreadable: list = field(default_factory=list)  # testing only: names kept as black images
    key: str = ""          # the files (names, sizes, times) and the stored size it was decoded from
    native: torch.Tensor = None  # at native scale: N x 2, each original image's height and width

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx], [self.names[i] for i in idx.tolist()], key=self.key,
                     native=None if self.native is None else self.native[idx])

    def crop_ranges(self, crop):
        """None, or at native scale (lo, hi): 2 x N first and last canvas offsets of a training crop."""
        return None if self.native is None else native_crop_ranges(self.native, self.images.shape[1], crop)


def parse_label(path):
    m = re.match(r"(\d+)_", path.name)
    if not m:
        raise UserError(f"{path}: a labeled file must be named <class>_<n>.jpg "
                        "with an integer class; move or rename it")
    return int(m.group(1))


def list_images(root, split):
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder}: split folder missing (a data root holds training/, "
                        "validation/ and optionally testing/)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise UserError(f"{folder}: no .jpg/.jpeg/.png images in this split")
    return files


def jpeg_is_truncated(data):
    """True when a JPEG's bytes end before its end marker (OpenCV would quietly fill the rest
    with grey). Walks the marker segments and the scans' entropy-coded data, so bytes after the
    image (camera notes, an appended video) are never mistaken for part of it. A layout this
    walk does not follow is left to OpenCV."""
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False  # not a layout we follow
        marker = data[pos + 1]
        if marker == 0xD9:
            return False  # the end marker: whole
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if pos + 3 >= n:
            return True
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # a scan: entropy-coded data up to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return True
                follow = data[pos + 1]
                if follow == 0x00 or 0xD0 <= follow <= 0xD7:  # a stuffed 0xFF, a restart marker
                    pos += 2
                elif follow == 0xFF:
                    pos += 1
                else:
                    break
    return True


def decode_image(path, size):
    """RGB uint8 S x S: shorter side resized to `size`, then the centre square. None if bad."""
    img = read_image(path)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size, ::-1])


def decode_native(path, size, crop):
    """(the native-scale RGB canvas of native_canvas, the image's (height, width)), or None if bad."""
    img = read_image(path)
    return None if img is None else (native_canvas(img[:, :, ::-1], size, crop), img.shape[:2])


def read_image(path):
    """An image file as 8-bit BGR (grey, RGBA, CMYK, 16-bit converted), or None if it cannot be read."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:  # unreadable (permissions, a vanished file): skipped and said like a corrupt one
        return None
    if raw.size == 0:
        return None
    if raw[:2].tobytes() == b"\xff\xd8" and jpeg_is_truncated(raw.tobytes()):
        return None
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR)  # grey, RGBA, CMYK, 16-bit -> 8-bit BGR
    return None if img is None or img.size == 0 else img


# ---- native scale: the course's crops, held as a fixed canvas per image ----------------------

def native_canvas(img, size, crop):
    """The size x size square of an image at its own scale whose centre crop x crop is
    torchvision's CenterCrop(crop) of it. Beyond the image's edges the canvas mirrors it
    (torchvision's 'symmetric' padding), as the course's RandomCrop(pad_if_needed=True,
    padding_mode='symmetric') padded its training crops; so a side shorter than the crop is
    mirrored, where CenterCrop would pad it black."""
    rows = mirror(np.arange(size) + canvas_origin(img.shape[0], size, crop), img.shape[0])
    cols = mirror(np.arange(size) + canvas_origin(img.shape[1], size, crop), img.shape[1])
    return np.ascontiguousarray(img[rows[:, None], cols[None, :]])


def canvas_origin(length, size, crop):
    """Where (in image pixels, along one axis) the canvas starts: its centre crop sits where
    torchvision's CenterCrop puts the crop."""
    short = crop - length  # a shorter side: pad_if_needed's padding on both sides, then the centre
    centre = int(round((length - crop) / 2.0)) if length >= crop else int(round(short / 2.0)) - short
    return centre - (size - crop) // 2


def mirror(i, n):
    """Index i of a length-n axis extended by symmetric reflection (... 1 0 | 0 1 .. n-1 | n-1 ...)."""
    m = np.mod(i, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def native_crop_ranges(shapes, size, crop):
    """(lo, hi), 2 x N: the canvas offsets a training crop of each image may start at. As the
    course's RandomCrop: anywhere inside an image side at least `crop` long, anywhere in the
    mirrored padding of a shorter one; within the canvas."""
    lo, hi = [], []
    for length in shapes.T.tolist():
        pairs = [((0, n - crop) if n >= crop else (n - crop, 0), canvas_origin(n, size, crop)) for n in length]
        lo.append([min(max(a - o, 0), size - crop) for (a, _), o in pairs])
        hi.append([min(max(b - o, 0), size - crop) for (_, b), o in pairs])
    return torch.tensor(lo), torch.tensor(hi)


def storage(resize, img_size):
    """(stored side, native crop): resize=-1 holds a native-scale canvas of 1.5 x img_size
    per image (native_canvas); else the shorter side is resized to `resize` (0: img_size * 8/7)."""
    if resize == NATIVE:
        return round(img_size * 1.5), img_size
    return resize or round(img_size * 8 / 7), 0


def cache_key(files, size):
    h = hashlib.sha1(f"v2|{size}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def decode_split(files, size, native_crop=0):
    """[(path, image or None)], decoded in parallel; at native scale each image is a
    (canvas, (height, width)) pair."""
    pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1))  # OpenCV releases the GIL while decoding
    decode = (lambda p: decode_native(p, size, native_crop)) if native_crop else (lambda p: decode_image(p, size))
    try:
        images = list(tqdm(pool.map(decode, files), total=len(files),
                           desc=f"decoding {files[0].parent.name}", leave=False, disable=None))
    finally:  # on Ctrl-C, drop the queued files instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)
    return list(zip(files, images))


def load_split(root, split, size, labeled=True, cache_dir=None, native_crop=0):
    """Decode a split once (or read it from the cache) into a Split of uint8 images: resized so
    the shorter side is `size`, or with native_crop a native-scale canvas of side `size`.

    An unreadable labeled image is skipped; an unreadable test image is kept as a black one
    (listed in Split.unreadable) so that the submission still has its row."""
    files = list_images(root, split)
    labels = [parse_label(p) for p in files] if labeled else [-1] * len(files)
    stored = f"native{native_crop}c{size}" if native_crop else str(size)
    cache, key = None, cache_key(files, stored)
    if cache_dir:
        tag = re.sub(r"[^A-Za-z0-9]+", "-", Path(root).resolve().name)
        cache = Path(cache_dir) / f"{tag}-{split}-{stored}-{key}.npz"
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    return Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                 [str(n) for n in z["names"]], [str(n) for n in z["unreadable"]], key,
                                 torch.from_numpy(z["native"]) if native_crop else None)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                warn(f"{cache}: damaged cache; decoding {split} again")
    by_name = dict(zip((p.name for p in files), labels))
    kept, unreadable, shapes = [], [], []
    for path, img in decode_split(files, size, native_crop):
        if img is None and labeled:
            warn(f"skipping {path}: not a readable image (empty, truncated or corrupt)")
            continue
        if img is None:  # said when its prediction is written
            unreadable.append(path.name)
            img = np.zeros((size, size, 3), np.uint8)
            img = (img, (size, size)) if native_crop else img
        if native_crop:
            img, shape = img
            shapes.append(shape)
        kept.append((path, img))
    if not kept:
        raise UserError(f"{Path(root) / split}: no readable image left in this split")
    images = np.stack([img for _, img in kept])
    label_arr = np.array([by_name[p.name] for p, _ in kept], dtype=np.int64)
    names = [p.name for p, _ in kept]
    native = np.array(shapes, dtype=np.int32).reshape(-1, 2) if native_crop else None
    if cache:
        write_cache(cache, images=images, labels=label_arr, names=np.array(names),
                    unreadable=np.array(unreadable, dtype=str), **({"native": native} if native_crop else {}))
    return Split(torch.from_numpy(images), torch.from_numpy(label_arr), names, unreadable, key,
                 None if native is None else torch.from_numpy(native))


def write_cache(path, **arrays):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npz"):
            old.unlink()  # a changed data set leaves no stale copy behind
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except (OSError, UserError) as e:
        warn(f"could not cache decoded images in {path.parent} ({getattr(e, 'strerror', None) or e}); "
             "the next run decodes them again")


@dataclass
class Data:
    train: Split      # training images minus the selection split
    val: Split        # reports every accuracy; chooses nothing (unless select_fraction=0)
    test: Split       # None when the root has no testing/
    num_classes: int
    class_names: list
    root: str
    select: Split = None   # chooses every epoch, round and file; `val` when select_fraction=0
    selection: dict = None  # {"select_fraction", "select_key"}: recorded in each checkpoint
    files_key: str = ""    # the training file names: what a resumable state was trained on

    @property
    def chosen_on(self):
        return "selection" if self.selection["select_fraction"] else "validation (optimistic)"


def load_data(root, resize, cache_dir=None, splits=("training", "validation", "testing"),
              select_fraction=0.0, native_crop=0):
    """The splits, each stored at `resize` (and at native scale with native_crop, see load_split)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found (it must hold training/ and validation/)")
    names = class_names(root)

    def load(split, labeled=True):
        return load_split(root, split, resize, labeled, cache_dir, native_crop)
    train = load("training") if "training" in splits else None
    val = load("validation")
    test = None
    if "testing" in splits and (root / "testing").is_dir():
        test = load("testing", labeled=False)
    data = Data(train, val, test, len(names), names, str(root), files_key=training_key(root))
    return hold_out_selection(data, select_fraction)


def training_key(root):
    return names_key([p.name for p in list_images(root, "training")])


def selection_indices(names, labels, fraction):
    """The selection split: in each class, the round(fraction * n) files whose names hash
    lowest (at least 1, and at least 1 left to train on). Deterministic from the file list,
    and adding files to one class moves no other file in or out."""
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for members in by_class.values():
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        members.sort(key=lambda i: hashlib.sha1(names[i].encode()).digest())
        chosen += members[:k]
    return sorted(chosen)


def names_key(names):
    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:16]


def hold_out_selection(data, fraction):
    """Split data.train into training and selection; with fraction 0, validation selects."""
    data.selection = {"select_fraction": fraction, "select_key": ""}
    data.select = data.val
    if not fraction or data.train is None:
        return data
    idx = selection_indices(data.train.names, data.train.labels.tolist(), fraction)
    if not idx:
        raise UserError(f"--select_fraction={fraction}: no class has 2 training images to "
                        "spare one for the selection split; use --select_fraction=0")
    rest = sorted(set(range(len(data.train.names))) - set(idx))
    data.select, data.train = data.train.subset(idx), data.train.subset(rest)
    data.selection["select_key"] = names_key(data.select.names)
    return data


def class_names(root):
    """From classes.txt, else from the largest label among the training and validation file
    names (so a stage that decodes only some splits sees the same classes)."""
    labels = {p: parse_label(p) for split in ("training", "validation") for p in list_images(root, split)}
    names = read_class_names(root)
    if names is None:
        count = 1 + max(labels.values())
        return FOOD11_CLASSES if count == 11 else [f"class {i}" for i in range(count)]
    for path, label in labels.items():
        if label >= len(names):
            raise UserError(f"{path}: label {label} is outside classes.txt ({len(names)} classes)")
    return names


def read_class_names(root):
    path = Path(root) / "classes.txt"
    if not path.exists():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e.reason})") from None
    if not names:
        raise UserError(f"{path}: empty; it must name one class per line")
    return names


def data_for(cfg, splits=("training", "validation", "testing"), recorded=None):
    """The data a script's settings point at, announced in one line. `recorded`: the
    selection a checkpoint was chosen with; a different one is said."""
    if cfg.notice:
        print(cfg.notice)
        try:
            make_sample(cfg.data_dir)
        except OSError as e:
            raise UserError(f"{cfg.data_dir}: cannot write the generated sample here ({e.strerror}); "
                            "give --data_dir=PATH") from None
    stored, native_crop = storage(resize_of(cfg), cfg.img_size)
    data = load_data(cfg.data_dir, stored, cfg.get("cache_dir"), splits, cfg.get("select_fraction", 0.0),
                     native_crop)
    sizes = [f"{n} {len(s.labels)}" for n, s in
             (("training", data.train), ("validation", data.val), ("testing", data.test)) if s is not None]
    if data.select is not data.val:
        sizes.insert(1, f"selection {len(data.select.labels)} (held out of training to choose models)")
    how = (f"native scale, a {stored} px canvas each" if native_crop else f"{stored} px stored")
    print(f"data: {data.root}: {data.num_classes} classes; {', '.join(sizes)} images "
          f"({how}, {cfg.img_size} px crops)")
    if recorded:
        check_selection(data, recorded, recorded["source"])
    return data


def check_selection(data, recorded, source):
    """Warn when a model was made with another selection split than the one choosing now."""
    if "select_fraction" in recorded and data.selection != {k: recorded.get(k) for k in data.selection}:
        warn(f"this selection split differs from the one {source} was made with (another "
             "select_fraction or other training files): its images may have been trained on")


def resize_of(cfg):
    return cfg.resize or round(cfg.img_size * 8 / 7)


# ============================================================================================
# The generated sample: 11 learnable classes in Food-11's layout, made once
# ============================================================================================

def make_sample(root, per_class=(30, 10), test_count=55, size=48, seed=0):
    """Deterministic synthetic 'food': each class a colour and stripe angle, with noise."""
    root = Path(root)
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size

    def picture(c):
        hue = (c * 180 // 11 + rng.integers(-10, 11)) % 180
        angle = math.pi * c / 11 + rng.normal(0, 0.2)
        freq = 3 + (c % 3) * 2
        stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle))
                                     + rng.uniform(0, 2 * math.pi))
        hsv = np.stack([np.full_like(xx, hue), 90 + 120 * stripes, 80 + 150 * stripes], -1)
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
        img = img * rng.uniform(0.6, 1.2) + rng.normal(0, 50, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    for split, count in (("training", per_class[0]), ("validation", per_class[1])):
        (root / split).mkdir(parents=True, exist_ok=True)
        for c in range(11):
            for n in range(count):
                cv2.imwrite(str(root / split / f"{c}_{n}.jpg"), picture(c))
    (root / "testing").mkdir(parents=True, exist_ok=True)
    for n in range(test_count):
        cv2.imwrite(str(root / "testing" / f"{n:04d}.jpg"), picture(n % 11))
    (root / "done").write_text("generated by common.make_sample\n")
    return root


# ============================================================================================
# Batches: whole-batch augmentation on uint8 tensors, normalisation per model
# ============================================================================================

def to_device_images(split, device):
    """The split's uint8 images on the device, once per run (NHWC: channels_last for free)."""
    return split.images.to(device), split.labels.to(device)


def seeded(*parts):
    """A generator seeded from its parts alone (stable across runs and machines)."""
    digest = hashlib.sha1("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


@dataclass(frozen=True)
class Augment:
    """Training augmentation: a random crop at the stored size, a horizontal flip, a rotation
    and a colour jitter. View v of image i is drawn from (seed, v) alone, so it can be rebuilt
    at any time without storing pixels (the teacher bank relies on that)."""
    crop: int
    rotate: float = 0.0
    jitter: float = 0.0
    seed: int = 0

    def draws(self, view, n, size, ranges=None):
        """The random choices of view `view` for each of n images stored at `size` px; crops
        start anywhere, or (native scale) within each image's ranges (lo, hi)."""
        gen = seeded(self.seed, "view", view)
        if ranges is None:
            off = torch.randint(0, size - self.crop + 1, (2, n), generator=gen)
        else:
            lo, hi = ranges
            off = lo + (torch.rand(2, n, generator=gen) * (hi - lo + 1)).long()
        return {"off": off,
                "flip": torch.rand(n, generator=gen) < 0.5,
                "angle": (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.rotate),
                "factors": 1 + (torch.rand(3, n, generator=gen) * 2 - 1) * self.jitter}

    def apply(self, images, idx, draws):
        """The views of images[idx] (floats in [0, 1], channels_last), the whole batch at once."""
        x = to_float(crop_flip(images, idx, self.crop, draws["off"][:, idx], draws["flip"][idx]))
        if self.rotate:
            x = rotate_batch(x, draws["angle"][idx])
        if self.jitter:
            x = jitter_batch(x, draws["factors"][:, idx])
        return x.contiguous(memory_format=torch.channels_last)


def augment_of(cfg):
    return Augment(cfg.img_size, cfg.get("rotate", 0.0), cfg.get("jitter", 0.0), cfg.seed)


def crop_flip(images, idx, crop, off, flip):
    """Per-image crop at offsets off (2 x n) and horizontal flip of images[idx], by one gather."""
    ar = torch.arange(crop)
    rows = off[0, :, None] + ar
    cols = off[1, :, None] + torch.where(flip[:, None], crop - 1 - ar, ar)
    dev = images.device
    return images[idx.to(dev)[:, None, None], rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]


def to_float(batch_nhwc):
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1], channels_last in memory."""
    return batch_nhwc.permute(0, 3, 1, 2).float().div_(255)


def rotate_batch(x, angle):
    """Rotate each image by its angle (radians) about its centre."""
    n = x.shape[0]
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # Reflected, not black, corners: on black-cornered images the teacher's soft labels taught
    # the student less in our food101-10 runs (README, "What was tried").
    return F.grid_sample(x.contiguous(), grid, padding_mode="reflection", align_corners=False)


def jitter_batch(x, factors):
    """Brightness, contrast and saturation, scaled per image by factors (3 x n: b, c, s).

    Applied one after the other these are x*b, then (x-mean)*c+mean, then (x-grey)*s+grey;
    folded together they are one pass: A*x + B*grey(x) + C with per-image A, B, C.
    """
    b, c, s = factors.view(3, -1, 1, 1, 1).to(x.device)
    # Summed in float64: a float32 sum's order (so its last bit) depends on how many images share
    # the batch, and a view must come out the same in any batch (the teacher bank relies on it).
    mean = (x.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float64) / x[0].numel()).float() * b
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.addcmul(mean * (1 - c), x, s * b * c).add_(grey.mul_((1 - s) * b * c)).clamp_(0, 1)


def normalize(x, norm):
    if norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    return x


class Batch(NamedTuple):
    x: torch.Tensor    # augmented floats in [0, 1], N x 3 x H x W
    y: torch.Tensor    # labels
    idx: torch.Tensor  # the images' indices in the training split (CPU)
    view: int          # which view of them x is


def train_batches(images, labels, batch_size, aug, epoch, view, ranges=None):
    """Epoch `epoch`'s shuffled batches of view `view`; the last partial batch is dropped.
    The order is drawn from (seed, epoch), the view from (seed, view); `ranges`: a native-scale
    split's crop ranges (Split.crop_ranges)."""
    n = len(labels)
    draws = aug.draws(view, n, images.shape[1], ranges)
    order = torch.randperm(n, generator=seeded(aug.seed, "order", epoch))
    batch_size = min(batch_size, n)
    for i in range(0, n - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield Batch(aug.apply(images, idx, draws), labels[idx.to(labels.device)], idx, view)


def eval_batches(images, labels, batch_size, crop):
    size = images.shape[1]
    top = (size - crop) // 2
    for i in range(0, len(labels), batch_size):
        yield to_float(images[i:i + batch_size, top:top + crop, top:top + crop]), labels[i:i + batch_size]


# ============================================================================================
# Models
# ============================================================================================

MULTIPLIERS = [1, 2, 4, 8, 16, 16, 16, 16]


def student_widths(base=16, width_mult=1.0):
    widths = [base * m for m in MULTIPLIERS]
    for i in range(3, 7):
        widths[i] = int(widths[i] * width_mult)
    return widths


class StudentNet(nn.Module):
    """The course's MobileNet-v1 student: full conv, then 7 depthwise-separable blocks.

    Parameter names match the course's `student_custom_small.bin` (256,779 parameters at
    base 16, width_mult 1, 11 classes). `widths` (one output width per block) rebuilds a
    pruned shape.
    """

    def __init__(self, base=16, width_mult=1.0, num_classes=11, widths=None):
        super().__init__()
        w = list(widths) if widths is not None else student_widths(base, width_mult)
        if len(w) != 8 or min(w) < 1:
            raise ValueError(f"widths must be 8 positive channel counts, got {w}")
        self.widths = w
        blocks = [nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1), nn.BatchNorm2d(w[0]), nn.ReLU6(),
                                nn.MaxPool2d(2, 2, 0))]
        for i in range(1, 8):
            layers = [nn.Conv2d(w[i - 1], w[i - 1], 3, 1, 1, groups=w[i - 1]),
                      nn.BatchNorm2d(w[i - 1]), nn.ReLU6(), nn.Conv2d(w[i - 1], w[i], 1)]
            if i <= 3:
                layers.append(nn.MaxPool2d(2, 2, 0))
            blocks.append(nn.Sequential(*layers))
        blocks.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.cnn = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(w[7], num_classes))

    def forward(self, x):
        return self.fc(self.cnn(x).flatten(1))


def make_teacher(num_classes):
    return torchvision.models.resnet18(num_classes=num_classes)


def arch_of(model):
    if isinstance(model, StudentNet):
        return {"kind": "student", "widths": list(model.widths),
                "num_classes": model.fc[0].out_features}
    return {"kind": "resnet18", "num_classes": model.fc.out_features}


def build_model(arch):
    if arch["kind"] == "student":
        return StudentNet(widths=arch["widths"], num_classes=arch["num_classes"])
    if arch["kind"] == "resnet18":
        return make_teacher(arch["num_classes"])
    raise UserError(f"unknown model kind {arch['kind']!r}")


def arch_from_state_dict(sd):
    """Recognise a plain state_dict (the course's files) by its keys and shapes."""
    try:
        if "cnn.0.0.weight" in sd:
            widths = [sd["cnn.0.0.weight"].shape[0]] + [sd[f"cnn.{i}.3.weight"].shape[0] for i in range(1, 8)]
            return {"kind": "student", "widths": widths, "num_classes": sd["fc.0.weight"].shape[0]}
        if "conv1.weight" in sd and "layer4.1.bn2.weight" in sd:
            return {"kind": "resnet18", "num_classes": sd["fc.weight"].shape[0]}
    except (KeyError, AttributeError):
        pass
    return None


def describe(arch):
    if arch["kind"] == "student":
        return f"a StudentNet (widths {arch['widths']}) with {arch['num_classes']} classes"
    return f"a ResNet18 with {arch['num_classes']} classes"


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, img_size):
    from torch.utils.flop_counter import FlopCounterMode
    model = model.eval()
    x = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            have = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
            raise UserError(f"--device={name}: {have} here; use --device=auto or cpu")
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps: no Apple GPU here; use --device=auto or cpu")
    return torch.device(name)


def prepare(model, device):
    return model.to(device=device, memory_format=torch.channels_last)


# ============================================================================================
# Checkpoints: {"arch", "preprocess", "state_dict", "metrics"}, written atomically
# ============================================================================================

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
        reason = getattr(e, "strerror", None) or "the write failed; is the disk full?"
        raise UserError(f"{path}: could not be written ({reason}); it is as it was before") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def new_path(path):
    """Where a run keeps a new output until it finishes: `<name>.new` beside `<name>`."""
    return Path(path).with_name(Path(path).name + ".new")


def publish(ckpt_dir, outputs=(), records=(), finished=()):
    """The end of a completed run: each output's `.new` file replaces it, and the results log
    takes the run's records, together (Ctrl-C waits until both are done). `finished`: files of
    the run (resumable states) to remove afterwards. Returns the paths written."""
    ckpt_dir = Path(ckpt_dir)
    names = {r["model"] for r in records}
    rows = [r for r in read_results(ckpt_dir) if r["model"] not in names] + list(records)
    staged = new_path(ckpt_dir / RESULTS)
    text = json.dumps(rows, indent=1).encode()
    atomic_write(staged, lambda f: f.write(text))
    for path in [*outputs, ckpt_dir / RESULTS]:  # what would stop a swap halfway is found first
        if Path(path).is_dir() or not new_path(path).is_file():
            raise UserError(f"{path}: is a folder, or its new version is missing; nothing was replaced")
    with signals_deferred():
        for path in outputs:
            os.replace(new_path(path), path)
        os.replace(staged, ckpt_dir / RESULTS)
    for path in finished:
        Path(path).unlink(missing_ok=True)
    return [Path(p) for p in outputs] + [ckpt_dir / RESULTS]


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then interrupt as usual. (Python runs
    signal handlers in the main thread, whichever thread the signal reached.)"""
    caught = []
    old = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def say_written(paths):
    print("wrote " + ", ".join(str(p) for p in paths))


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


def cpu_state_dict(model):
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def checkpoint(model, preprocess, metrics=None):
    """What our .pt files hold: the model's shape, its preprocessing, its weights, its metrics."""
    return {"arch": arch_of(model), "preprocess": dict(preprocess), "state_dict": cpu_state_dict(model),
            "metrics": dict(metrics or {})}


def save_checkpoint(path, model, preprocess, metrics=None):
    atomic_torch_save(checkpoint(model, preprocess, metrics), path)


def saved_bytes(obj):
    """The size of the file torch.save would write for obj."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


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


def load_model(path, expect=None, num_classes=None, plain_norm="none", made_by=None):
    """(model, preprocess, metrics) from one of our checkpoints or a plain state_dict.

    A plain state_dict carries no preprocessing; `plain_norm` says how it was trained.
    """
    obj = torch_load(path, made_by)
    if isinstance(obj, dict) and "state_dict" in obj and "arch" in obj:
        sd, arch = obj["state_dict"], obj["arch"]
        preprocess, metrics = {"norm": STUDENT_NORM, **obj.get("preprocess", {})}, obj.get("metrics", {})
    elif isinstance(obj, dict):  # no record: the course's convention (no normalisation) means its scale too
        sd, arch = obj, arch_from_state_dict(obj)
        preprocess, metrics = {"norm": plain_norm, **({"resize": NATIVE} if plain_norm == "none" else {})}, {}
    else:
        sd = arch = None
    if arch is None:
        raise UserError(f"{path}: not a StudentNet or ResNet18 checkpoint")
    wanted = {"kind": expect, "num_classes": num_classes}
    if any(v is not None and arch.get(k) != v for k, v in wanted.items()):
        want = describe({"kind": expect or arch["kind"], "num_classes": num_classes or arch["num_classes"],
                         "widths": arch.get("widths")})
        raise UserError(f"{path}: holds {describe(arch)}, but {want} is needed here")
    model = build_model(arch)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit {describe(arch)} "
                        f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, preprocess, metrics


def as_given(cfg, preprocess):
    """A model's recorded preprocessing, but with the sizes given on the command line."""
    if {"img_size", "resize"} & cfg.given:
        return {**preprocess, "img_size": cfg.img_size, "resize": resize_of(cfg)}
    return preprocess


def adopt_from(cfg, path, made_by):
    """The settings checkpoint `path` records (preprocessing, selection split) replace the
    script's defaults, not what was given (adopt_recorded). Returns the record, named."""
    obj = torch_load(path, made_by)
    record = obj.get("preprocess", {}) if isinstance(obj, dict) and "arch" in obj else {}
    adopt_recorded(cfg, record, Path(path).name)
    return {**record, "source": Path(path).name, "metrics": obj.get("metrics", {}) if isinstance(obj, dict) else {}}


TEACHER_FILE = "teacher_resnet18.bin"


def teacher_preprocess_path(path):
    return Path(path).with_suffix(".json")


def file_sha1(path):
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    return h.hexdigest()


def save_teacher(path, model, norm, metrics):
    """The course's format (a plain state_dict) plus a JSON note of its preprocessing, both as
    `.new` files for publish(). Returns the two paths to publish."""
    note_path = teacher_preprocess_path(path)
    atomic_torch_save(cpu_state_dict(model), new_path(path))
    note = {"norm": norm, "sha1": file_sha1(new_path(path)), **metrics}
    atomic_write(new_path(note_path), lambda f: f.write(json.dumps(note, indent=1).encode()))
    return [Path(path), note_path]


def load_teacher(ckpt_dir, num_classes, teacher_norm):
    """(teacher, norm). The norm comes from the note 00_teacher.py writes beside the file,
    else (the course's file, the shared one) from the teacher_norm setting."""
    path = Path(ckpt_dir) / TEACHER_FILE
    model = load_model(path, expect="resnet18", num_classes=num_classes, made_by="00_teacher.py")[0]
    norm = teacher_norm_of(ckpt_dir, teacher_norm)
    if norm != teacher_norm:
        print(f"note: {path.name} was trained with norm={norm}, as its .json note records; "
              f"using that, not --teacher_norm={teacher_norm}")
    return model, norm


def course_scale(cfg, ckpt_dir):
    """The course's files were trained on native-scale crops in [0,1]. A teacher file without a
    note, read with teacher_norm=none (their convention), is therefore used at native scale:
    this run's resize becomes -1 unless --resize was given. Said in one line."""
    if "resize" in cfg.given or cfg.resize == NATIVE or cfg.teacher_norm != "none" \
            or not (Path(ckpt_dir) / TEACHER_FILE).exists() or teacher_note(ckpt_dir) is not None:
        return
    cfg.resize = NATIVE
    print(f"note: {TEACHER_FILE} has no note and teacher_norm=none, the course's convention, so it is "
          "used as the course trained it: native-scale crops (resize=-1); --resize=0 resizes instead")


def describe_preprocess(preprocess, cfg):
    """What a model sees, in words: crop, scale, normalisation."""
    crop = preprocess.get("img_size") or cfg.img_size
    resize = preprocess.get("resize") or resize_of(cfg)
    scale = "native scale" if resize == NATIVE else f"shorter side resized to {resize}"
    norm = "ImageNet mean/std" if preprocess["norm"] == "imagenet" else "[0,1], no normalisation"
    return f"{crop} px centre crops, {scale}, {norm}"


def teacher_norm_of(ckpt_dir, teacher_norm):
    """The teacher's input normalisation: its note's, else the teacher_norm setting."""
    note = teacher_note(ckpt_dir)
    return note["norm"] if note else teacher_norm


def teacher_note(ckpt_dir):
    """The note 00_teacher.py wrote beside the teacher file, if it is there and still about that
    file (its SHA-1); else None. Read before any work, so a damaged note stops nothing late."""
    path = Path(ckpt_dir) / TEACHER_FILE
    note_path = teacher_preprocess_path(path)
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


def file_bytes(path):
    return Path(path).stat().st_size


# ============================================================================================
# Losses
# ============================================================================================

def kd_loss(student_logits, teacher_logits, labels, T, alpha):
    """alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y), KL on log_softmax(s/T)."""
    s, t = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, labels)


def distill_loss(teacher, T, alpha):
    """A loss(logits, batch) for fit(): kd_loss against teacher(batch), the teacher's logits for
    the batch's view (an InlineTeacher or a TeacherBank)."""
    def loss(logits, batch):
        return kd_loss(logits, teacher(batch), batch.y, T, alpha)
    loss.describe = f"distillation T={T} alpha={alpha}"
    return loss


def bn_l1(model):
    """Network slimming's sparsity term: the L1 norm of every BatchNorm gamma."""
    return sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ============================================================================================
# The teacher: asked on every batch, or once per view into a bank of its logits
# ============================================================================================

class InlineTeacher:
    """The frozen teacher asked about every batch as it comes (--teacher_bank=False)."""

    def __init__(self, model, norm):
        self.model, self.norm, self.images = model.eval().requires_grad_(False), norm, 0

    def __call__(self, batch):
        with torch.inference_mode(), autocast(batch.x.device):
            t = self.model(normalize(batch.x, self.norm))
        self.images += len(t)
        return t.clone()  # a normal tensor autograd may keep


BANK_VERSION = 1


class TeacherBank:
    """The teacher's logits (float16) for views 0, 1, ... of every training image, asked once.

    One .npz file under ckpt_dir, named by a key of everything the logits depend on: the
    teacher file's SHA-1 and its norm, the training images (file names, sizes and times, the
    stored size), the crop size, the augmentation settings and the seed. Any change makes a
    new bank; a stale one is never served. Views are built when first needed, each saved when
    done (a view cut short by Ctrl-C keeps its finished rows), so a build resumes by itself; the
    teacher is loaded only when some view is missing.
    """
    batch_size = None  # images per teacher forward; None: 1024 on a GPU (halved until it fits), 128 on a CPU

    def __init__(self, ckpt_dir, train, num_classes, aug, teacher_sha1, norm):
        self.key = json.dumps({"version": BANK_VERSION, "teacher_sha1": teacher_sha1, "norm": norm,
                               "images": train.key, "names": names_key(train.names),
                               "stored": int(train.images.shape[1]), "crop": aug.crop,
                               "rotate": aug.rotate, "jitter": aug.jitter, "seed": aug.seed}, sort_keys=True)
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:16]
        self.path = Path(ckpt_dir) / f"teacher_bank_{digest}.npz"
        self.train, self.aug, self.norm, self.images = train, aug, norm, 0
        self.n, self.num_classes = len(train.labels), num_classes
        self.views, self.on_device = self.read(), {}

    def read(self):
        """{view: float16 rows (all n, or the first ones of a build cut short)} from the file."""
        if not self.path.exists():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["key"]) != self.key:
                    raise ValueError("another key")
                views = {int(k.removeprefix("view_")): z[k] for k in z.files if k.startswith("view_")}
            if all(v.dtype == np.float16 and v.ndim == 2 and v.shape[1] == self.num_classes
                   and len(v) <= self.n for v in views.values()):
                return views
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass
        warn(f"{self.path}: damaged; building the teacher bank again")
        return {}

    def save(self):
        arrays = {f"view_{v}": rows for v, rows in sorted(self.views.items())}
        atomic_write(self.path, lambda f: np.savez(f, key=np.array(self.key), **arrays))

    def missing(self, views):
        return [v for v in views if len(self.views.get(v, ())) < self.n]

    def build(self, views, get_teacher, device):
        """Make sure the bank holds these views, asking the teacher (get_teacher() -> (model,
        norm)) about the missing ones at the largest batch that fits."""
        missing = self.missing(views)
        if not missing:
            print(f"teacher bank {self.path.name}: serves views 0-{max(views)}; the teacher is not loaded")
            return self
        print(f"teacher bank {self.path.name}: asking the teacher about views {', '.join(map(str, missing))} "
              f"of {self.n} training images ({sum(v in self.views for v in missing)} resumed)")
        model = prepare(get_teacher()[0], device).eval()
        images, _ = to_device_images(self.train, device)
        todo = sum(self.n - len(self.views.get(v, ())) for v in missing)
        bar = tqdm(total=todo, desc="teacher bank", leave=False, disable=None, unit="img")
        batch_size = self.batch_size or (1024 if device.type == "cuda" else 128)
        ranges = self.train.crop_ranges(self.aug.crop)  # once: at native scale a loop over every image
        for v in missing:
            draws = self.aug.draws(v, self.n, images.shape[1], ranges)
            rows = [torch.from_numpy(self.views.get(v, np.zeros((0, self.num_classes), np.float16)))]
            done = len(rows[0])
            try:
                while done < self.n:
                    try:
                        rows.append(self.ask(model, images, torch.arange(done, min(self.n, done + batch_size)), draws))
                    except torch.cuda.OutOfMemoryError:
                        if batch_size == 1:
                            raise
                        batch_size //= 2
                        torch.cuda.empty_cache()
                        continue
                    done += len(rows[-1])
                    self.images += len(rows[-1])
                    bar.update(len(rows[-1]))
            except KeyboardInterrupt:
                bar.close()
                self.views[v] = torch.cat(rows).numpy()
                self.save()
                raise Interrupted(f"the teacher bank was being built; {self.path} keeps what was done "
                                  "(rerun to go on from there); the previous outputs are as they were") from None
            self.views[v] = torch.cat(rows).numpy()
            self.save()
        bar.close()
        return self

    def ask(self, model, images, idx, draws):
        with torch.inference_mode(), autocast(images.device):
            return model(normalize(self.aug.apply(images, idx, draws), self.norm)).half().cpu()

    def __call__(self, batch):
        if batch.view not in self.on_device:
            rows = self.views.get(batch.view)
            if rows is None or len(rows) < self.n:
                raise RuntimeError(f"view {batch.view} is not in the teacher bank")  # fit asks only for built views
            self.on_device[batch.view] = torch.from_numpy(rows).to(batch.y.device)
        return self.on_device[batch.view][batch.idx.to(batch.y.device)]


DISTILLED_WITH = ("teacher_norm", "rotate", "jitter", "seed")  # what 02 records for 03 and 04


def adopt_teacher_settings(cfg, kd_metrics, views_otherwise):
    """03 and 04 distil as 02 did, so they read the same teacher bank: the teacher's norm, the
    augmentation and the seed (each unless given), and the number of views (unless given), as
    student_kd.pt records them. Called before check_resume, which may still prefer a state's."""
    for name in DISTILLED_WITH:
        if name in cfg and name not in cfg.given and kd_metrics.get(name) not in (None, cfg[name]):
            print(f"{name}={kd_metrics[name]}, as student_kd.pt records")
            cfg[name] = kd_metrics[name]
    cfg.teacher_views = cfg.teacher_views or kd_metrics.get("views") or views_otherwise


def teacher_for(cfg, ckpt_dir, data, device, views, loaded=None):
    """What the distillation loss asks: the teacher bank holding `views` (built where missing),
    or with --teacher_bank=False the teacher itself on every batch. `loaded`: the (teacher, norm)
    the stage has loaded already, if it has."""
    def get_teacher():
        return loaded or load_teacher(ckpt_dir, data.num_classes, cfg.teacher_norm)
    if not cfg.teacher_bank:
        model, norm = get_teacher()
        print(f"teacher: asked about every batch (--teacher_bank=False), norm={norm}")
        return InlineTeacher(prepare(model, device), norm)
    norm = teacher_norm_of(ckpt_dir, cfg.teacher_norm)
    bank = TeacherBank(ckpt_dir, data.train, data.num_classes, augment_of(cfg),
                       file_sha1(Path(ckpt_dir) / TEACHER_FILE), norm)
    return bank.build(views, get_teacher, device)


# ============================================================================================
# Loops
# ============================================================================================

@contextmanager
def plain_fp32(device):
    """Evaluation in plain fp32 on every device (no autocast, no TF32), so that two files
    compared differ only by what was done to their weights."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def evaluate(model, images, labels, batch_size, crop, norm):
    """(mean cross-entropy, per-image correctness as a bool array) on centre crops, in fp32."""
    model.eval()
    total_loss, correct = 0.0, []
    with plain_fp32(images.device):
        for x, y in eval_batches(images, labels, batch_size, crop):
            logits = model(normalize(x, norm)).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum")
            correct.append(logits.argmax(1) == y)
    return float(total_loss) / len(labels), torch.cat(correct).cpu().numpy()


@torch.no_grad()
def predict(model, images, batch_size, crop, norm):
    model.eval()
    out = []
    with plain_fp32(images.device):
        for x, _ in eval_batches(images, torch.zeros(len(images), dtype=torch.long), batch_size, crop):
            out.append(model(normalize(x, norm)).argmax(1).cpu())
    return torch.cat(out)


class Score:
    """An accuracy on a fixed list of images, kept as per-image correctness so that two models
    can be compared image by image."""

    def __init__(self, correct, key=None):
        self.correct = np.asarray(correct, dtype=bool)
        self.key = key  # names_key of the images, so that only like is paired with like

    @property
    def n(self):
        return len(self.correct)

    @property
    def acc(self):
        return float(self.correct.mean())

    def interval(self, z=1.96):
        """Wilson's 95% interval: honest near 0 and 1 and for a few hundred images."""
        n, p = self.n, self.acc
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def __str__(self):
        lo, hi = self.interval()
        return f"{self.acc:.4f} [{lo:.3f}, {hi:.3f}]"

    def to_text(self):
        return np.packbits(self.correct).tobytes().hex()

    @classmethod
    def from_text(cls, text, n, key=None):
        return cls(np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8), count=n).astype(bool), key)


def mcnemar_p(only_a, only_b):
    """Exact two-sided McNemar test: P(a split of the discordant images this uneven or more)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired(a, b, resamples=10_000, seed=0):
    """Score b minus score a on the same images: the difference, its 95% bootstrap interval
    (images resampled in pairs), the exact McNemar p, and the images only a / only b got right."""
    if a.key != b.key or a.n != b.n:
        raise ValueError(f"paired scores need the same images ({a.n} vs {b.n} images)")
    a, b = a.correct, b.correct
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    pb, pa = only_b / n, only_a / n
    draws = np.random.default_rng(seed).multinomial(n, [pb, pa, max(0.0, 1 - pa - pb)], size=resamples)
    lo, hi = np.percentile((draws[:, 0] - draws[:, 1]) / n, [2.5, 97.5])
    return {"diff": pb - pa, "ci": (float(lo), float(hi)), "p": mcnemar_p(only_a, only_b),
            "only_a": only_a, "only_b": only_b}


def paired_row(name_a, a, name_b, b):
    """A table row: how model b differs from model a on the same validation images."""
    d = paired(a, b)
    lo, hi = d["ci"]
    return {"comparison": f"{name_b} - {name_a}", "difference [95% CI]": f"{d['diff']:+.4f} [{lo:+.3f}, {hi:+.3f}]",
            "McNemar p": f"{d['p']:.3g}", "right only before / after": f"{d['only_a']} / {d['only_b']}"}


class Scorer:
    """Scores a model on the validation or the selection images at the preprocessing it
    records (img_size, resize, norm; the script's settings where it records none). Each split
    goes to the device once per stored size."""

    def __init__(self, data, cfg, device):
        self.cfg, self.device, self.data = cfg, device, data
        self.by_storage = {storage(resize_of(cfg), cfg.img_size): data}
        self.on_device = {}

    def __call__(self, model, preprocess, split="val"):
        crop = preprocess.get("img_size") or self.cfg.img_size
        stored = storage(preprocess.get("resize") or resize_of(self.cfg), crop)
        if (stored, split) not in self.on_device:
            if stored not in self.by_storage:
                self.by_storage[stored] = load_data(self.cfg.data_dir, stored[0], self.cfg.get("cache_dir"),
                                                    ("training", "validation"),
                                                    self.data.selection["select_fraction"], stored[1])
            images = getattr(self.by_storage[stored], split)
            self.on_device[stored, split] = (*to_device_images(images, self.device), names_key(images.names))
        x, y, key = self.on_device[stored, split]
        _, correct = evaluate(prepare(model, self.device), x, y, self.cfg.batch_size, crop, preprocess["norm"])
        return Score(correct, key)

    def both(self, model, preprocess):
        """(validation Score, selection Score)."""
        return self(model, preprocess), self(model, preprocess, "select")


def resume_path(ckpt_path):
    return Path(ckpt_path).with_name(Path(ckpt_path).name + ".resume.pt")


# The settings that shape a training run: a resumable state records them, and resuming under
# other values is refused (or, for a value not given, the recorded one is used).
RUN_SHAPE = ("epochs", "finetune_epochs", "sparsity_epochs", "batch_size", "lr", "weight_decay",
             "label_smoothing", "img_size", "resize", "rotate", "jitter", "seed", "select_fraction",
             "temperature", "alpha", "sparsity", "base", "width_mult", "from_scratch", "teacher_norm",
             "use_teacher", "teacher_views", "norm", "schedule", "qat_epochs", "qat_lr")


def run_shape(cfg):
    """The user's settings that shape the run (values a stage derived itself are not theirs)."""
    return {k: cfg[k] for k in RUN_SHAPE if k in cfg and k not in getattr(cfg, "derived", ())}


def read_state(state_path):
    state = torch_load(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("shape"), dict):
        raise UserError(f"{state_path}: not a resumable state of this version; delete it or run "
                        "without --resume=True")
    return state


def check_resume(cfg, *ckpt_paths):
    """Before any work: each resumable state of these outputs must have been made with these
    settings. A given value that differs is an error naming both; a value not given is taken
    from the state, and said."""
    if not cfg.get("resume"):
        return
    for state_path in map(resume_path, ckpt_paths):
        if not state_path.exists():
            continue
        shape = read_state(state_path)["shape"]
        if shape.get("data") != training_key(cfg.data_dir):
            raise UserError(f"{state_path.name} was made on other training files than {cfg.data_dir}'s; "
                            "give the --data_dir it was made on, or run without --resume=True")
        if not new_path(state_path.with_name(state_path.name.removesuffix(".resume.pt"))).exists():
            raise UserError(f"{state_path}: the best model it goes with is missing; run without --resume=True")
        differ = {name: old for name, old in shape.items() if name in cfg and cfg[name] != old}
        for name, old in differ.items():
            if name in cfg.given:
                raise UserError(f"--{name}={cfg[name]}, but {state_path.name} was made with {name}={old}; "
                                f"give --{name}={old} to resume it, or run without --resume=True")
        for name, old in differ.items():
            print(f"resuming with {name}={old}, as {state_path.name} records")
            cfg[name] = old


def fit(model, data, cfg, ckpt_path, norm=STUDENT_NORM, loss_fn=None, sparsity=0.0, desc="train", notes=None):
    """Train with AdamW + one-cycle; keep the epoch that scores best on the selection split
    (never on validation, unless select_fraction=0) in `<ckpt_path>.new`, for the stage to
    publish() when it has finished.

    At the end of every epoch a resumable state (model, optimizer, schedule, epoch, best score,
    RNG, and what shaped the run) is written atomically to `<ckpt_path>.resume.pt`;
    `--resume=True` continues from it, and a finished state just returns. Returns the best
    checkpoint's metrics (with `notes`, which the checkpoint records too).
    """
    device = pick_device(cfg.device)
    model = prepare(model, device)
    ckpt_path = Path(ckpt_path)
    state_path, best_path = resume_path(ckpt_path), new_path(ckpt_path)
    preprocess = {"norm": norm, "img_size": cfg.img_size, "resize": resize_of(cfg), **data.selection}
    smoothing = cfg.get("label_smoothing", 0.0)
    loss_fn = loss_fn or (lambda logits, batch: F.cross_entropy(logits.float(), batch.y, label_smoothing=smoothing))
    views = cfg.get("teacher_views") or cfg.epochs  # epoch e trains on view e mod views
    shape = {**run_shape(cfg), "loss": getattr(loss_fn, "describe", "cross-entropy"),
             "sparsity_weight": sparsity, "widths": arch_of(model).get("widths"),
             "data": data.files_key, "views": views}
    train_x, train_y = to_device_images(data.train, device)
    sel_x, sel_y = to_device_images(data.select, device)
    sel_name = "select" if data.select is not data.val else "val"
    steps = len(train_y) // min(cfg.batch_size, len(train_y))
    aug, ranges = augment_of(cfg), data.train.crop_ranges(cfg.img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.get("weight_decay", 0.0))
    if cfg.get("schedule", "onecycle") == "constant":  # the course's
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                    pct_start=0.15)
    start, best = 0, {"select_acc": -1.0}
    if cfg.get("resume") and state_path.exists():
        start, best = resume(state_path, best_path, shape, model, opt, sched)
        print(f"resuming {desc} from {state_path} after epoch {start}"
              + (" (it had finished)" if start == cfg.epochs else ""))
    elif cfg.get("resume"):
        print(f"nothing to resume at {state_path}; starting from epoch 1")
    for epoch in range(start, cfg.epochs):
        try:
            batches = train_batches(train_x, train_y, cfg.batch_size, aug, epoch, epoch % views, ranges)
            train_loss, train_acc, seconds, speed = train_epoch(
                model, batches, steps, opt, sched, loss_fn, cfg, norm, sparsity, epoch)
        except KeyboardInterrupt:
            where = (f"{state_path} (after epoch {epoch}); rerun with --resume=True" if epoch
                     else "none yet, the first epoch had not finished")
            raise Interrupted(f"epoch {epoch + 1} of {desc} was abandoned; the previous outputs are as "
                              f"they were; resumable state: {where}") from None
        sel_loss, correct = evaluate(model, sel_x, sel_y, cfg.batch_size, cfg.img_size, norm)
        sel_acc = float(correct.mean())
        mark = ""
        if sel_acc > best["select_acc"]:
            best = {**epoch_metrics(sel_acc, sel_loss, epoch + 1, views), **(notes or {})}
            save_checkpoint(best_path, model, preprocess, best)
            mark = "  * best"
        atomic_torch_save({"model": cpu_state_dict(model), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                           "epoch": epoch + 1, "best": best,
                           "shape": shape}, state_path)
        print(f"{desc} epoch {epoch + 1:3d}/{cfg.epochs}  loss {train_loss:.3f} acc {train_acc:.3f}"
              f"  {sel_name} loss {sel_loss:.3f} acc {sel_acc:.3f}  {seconds:5.1f}s {speed:6.0f} img/s{mark}",
              flush=True)
    return best


def epoch_metrics(select_acc=0.0, select_loss=0.0, epoch=1, views=1):
    """What fit() records of the best epoch in its checkpoint (01 sizes a file with it)."""
    return {"select_acc": select_acc, "select_loss": select_loss, "epoch": epoch, "views": views}


def resume(state_path, best_path, shape, model, opt, sched):
    """Load a resumable state into the run's objects, after checking it is this run's."""
    state = read_state(state_path)
    for name, value in shape.items():
        if state["shape"].get(name) != value:
            raise UserError(f"{state_path}: made with {name}={state['shape'].get(name)}, this run has "
                            f"{name}={value}; delete it or run without --resume=True")
    if not best_path.exists():
        raise UserError(f"{state_path}: its best model {best_path.name} is missing; "
                        "run without --resume=True")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return state["epoch"], dict(state["best"])
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise UserError(f"{state_path}: damaged or of another model; delete it or run "
                        "without --resume=True") from None


def train_epoch(model, batches, steps, opt, sched, loss_fn, cfg, norm, sparsity, epoch):
    model.train()
    t0 = time.perf_counter()
    seen = correct = 0
    total = 0.0
    bar = tqdm(batches, total=steps, leave=False, desc=f"epoch {epoch + 1}", disable=None)
    for step, batch in enumerate(bar):
        with autocast(batch.x.device):
            logits = model(normalize(batch.x, norm))
        loss = loss_fn(logits, batch)
        y = batch.y
        if sparsity:
            loss = loss + sparsity * bn_l1(model)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; "
                            f"the best checkpoint is untouched; try a lower --lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(y)
        total += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
    seconds = time.perf_counter() - t0
    return total / seen, correct / seen, seconds, seen / seconds


# ============================================================================================
# Plots: drawn with OpenCV (no plotting package)
# ============================================================================================

GREY, BLUE, RED, INK, GRID = (150, 150, 150), (200, 90, 20), (30, 30, 220), (0, 0, 0), (225, 225, 225)


def nice_ticks(lo, hi, count=6):
    """About `count` ticks at round values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if hi - lo < 1e-6:  # one value (every round equally good): a small range around it
        lo, hi = lo - 0.01, hi + 0.01
    span = hi - lo
    magnitude = 10 ** math.floor(math.log10(span / count))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= span / count)
    first, last = math.floor(lo / step) * step, math.ceil(hi / step) * step
    return [round(first + i * step, 10) for i in range(round((last - first) / step) + 1)]


def text(img, s, org, scale=0.45):
    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, INK, 1, cv2.LINE_AA)


# ============================================================================================
# Results log: one record per model, one table across all stages
# ============================================================================================

RESULTS = "results.json"
VAL_COLUMN = "val acc [95% CI]"
COLUMNS = ("stage", "model", "params", "bytes", "macs", VAL_COLUMN)


def read_results(ckpt_dir):
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


def score_fields(val):
    """A validation Score as results-log fields: accuracy, interval and every image's outcome."""
    lo, hi = val.interval()
    return {"val_acc": round(val.acc, 4), "val_ci": [round(lo, 4), round(hi, 4)], "val_n": val.n,
            "val_key": val.key, "val_correct": val.to_text()}


def model_record(stage, name, model, path, val, img_size, **extra):
    """One model's record for publish(): its size, cost and validation Score."""
    return {"stage": stage, "model": name, "params": count_params(model), "bytes": file_bytes(path),
            "macs": count_macs(model.cpu().float(), img_size), **score_fields(val), **extra}


def recorded_score(record):
    """The validation Score a results record holds (None for a record without one)."""
    try:
        return Score.from_text(record["val_correct"], record["val_n"], record.get("val_key"))
    except (KeyError, ValueError, TypeError):  # an old or hand-edited record: no per-image outcome
        return None


def format_table(rows, columns=COLUMNS):
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if v is None:
            return ""
        return f"{v:,}" if isinstance(v, int) else str(v)
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def submission_ids(names):
    """The course's Id of each test file: its number (0000.jpg -> 0); files not all named by
    number get their position in name order."""
    stems = [Path(n).stem for n in names]
    if all(s.isdigit() for s in stems):
        return [int(s) for s in stems]
    order = {n: i for i, n in enumerate(sorted(names))}
    return [order[n] for n in names]


def write_predictions(path, split, preds):
    """The course's submission: Id,Category, rows in Id order; an unreadable image says 0.
    Returns (rows, rows of unreadable images)."""
    preds = preds.tolist()
    bad = set(split.unreadable)
    for name in split.unreadable:
        warn(f"{name}: not a readable image; its row in {Path(path).name.removesuffix('.new')} says class 0")
    rows = sorted((i, 0 if name in bad else c) for i, name, c in zip(submission_ids(split.names), split.names, preds))

    def write(f):
        f.write(("Id,Category\n" + "".join(f"{i},{c}\n" for i, c in rows)).encode())
    atomic_write(path, write)
    return len(rows), len(bad)


def seed_everything(seed):
    torch.manual_seed(seed)  # weights; batch order and views are drawn from (seed, epoch/view)
