"""Images: decoded once (OpenCV), held as one uint8 tensor per split, cached on disk; the
native-scale canvas of the course's crops; the generated sample."""
from __future__ import annotations  # the Tensor annotations below need no torch: predict.py decodes without it

import hashlib
import math
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from support import files
from support.running import UserError, warn

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
NATIVE = -1  # resize=-1: images keep their pixels (the scale the course's files were trained at)
FOOD11_CLASSES = ["Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles/Pasta", "Rice", "Seafood", "Soup", "Vegetable/Fruit"]


@dataclass
class Split:
    images: torch.Tensor   # N x S x S x 3 uint8 (RGB)
    labels: torch.Tensor   # N int64; -1 where unlabeled (testing)
    names: list            # file names, same order
    unreadable: list = field(default_factory=list)  # testing only: names kept as black images
    key: str = ""          # a key of the decoded pixels, labels and names (pixels_key)
    native: torch.Tensor = None  # at native scale: N x 2, each original image's height and width

    def subset(self, idx):
        import torch
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
    return images_in(folder, "split")[0]


def images_in(folder, what="folder"):
    """The images of a folder in name order, and how many other files it holds; none is an error."""
    entries = sorted(p for p in Path(folder).iterdir() if p.is_file())
    paths = [p for p in entries if p.suffix.lower() in IMAGE_EXTS]
    if not paths:
        raise UserError(f"{folder}: no .jpg/.jpeg/.png images in this {what}")
    return paths, len(entries) - len(paths)


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
    import torch
    lo, hi = [], []
    for length in shapes.T.tolist():
        pairs = [((0, n - crop) if n >= crop else (n - crop, 0), canvas_origin(n, size, crop)) for n in length]
        lo.append([min(max(a - o, 0), size - crop) for (a, _), o in pairs])
        hi.append([min(max(b - o, 0), size - crop) for (_, b), o in pairs])
    return torch.tensor(lo), torch.tensor(hi)


def centre_crop(images, crop):
    """The centre crop x crop of uint8 ... x S x S x 3 numpy images (one, or a batch), as the
    pipeline's evaluation takes it."""
    top = (images.shape[-3] - crop) // 2
    return np.ascontiguousarray(images[..., top:top + crop, top:top + crop, :])


def storage(resize, img_size):
    """(stored side, native crop): resize=-1 holds a native-scale canvas of 1.5 x img_size
    per image (native_canvas); else the shorter side is resized to `resize` (0: img_size * 8/7)."""
    if resize == NATIVE:
        return round(img_size * 1.5), img_size
    return resize or round(img_size * 8 / 7), 0


def pixels_key(images, labels, names, native=None):
    """A key of what a split decoded to, not of its files: a copied data folder, or one whose
    files got new times, keeps the teacher bank built on it."""
    h = hashlib.sha1()
    for array in (images, labels, native):
        if array is not None:
            h.update(np.ascontiguousarray(array).data)
    h.update("|".join(names).encode())
    return h.hexdigest()[:16]


def cache_key(files, size):
    """Where a split's decoded cache is: its files (names, sizes, times) and the stored size."""
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
    import torch
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
                    images, label_arr, names = z["images"], z["labels"], [str(n) for n in z["names"]]
                    native = z["native"] if native_crop else None
                    pixels = str(z["key"]) if "key" in z.files else pixels_key(images, label_arr, names, native)
                    return Split(torch.from_numpy(images), torch.from_numpy(label_arr), names,
                                 [str(n) for n in z["unreadable"]], pixels,
                                 None if native is None else torch.from_numpy(native))
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
    pixels = pixels_key(images, label_arr, names, native)
    if cache:
        write_cache(cache, images=images, labels=label_arr, names=np.array(names), key=np.array(pixels),
                    unreadable=np.array(unreadable, dtype=str), **({"native": native} if native_crop else {}))
    return Split(torch.from_numpy(images), torch.from_numpy(label_arr), names, unreadable, pixels,
                 None if native is None else torch.from_numpy(native))


def write_cache(path, **arrays):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npz"):
            old.unlink()  # a changed data set leaves no stale copy behind
        files.atomic_write(path, lambda f: np.savez(f, **arrays))
    except (OSError, UserError) as e:
        warn(f"could not cache decoded images in {path.parent} ({getattr(e, 'strerror', None) or e}); "
             "the next run decodes them again")


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


def names_key(names):
    """A short key of a list of file names (in any order)."""
    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:16]


def training_key(root):
    """What a resumable state was trained on: the training split's file names."""
    return names_key([p.name for p in list_images(root, "training")])


# ---- the generated sample: 11 learnable classes in Food-11's layout, made once -------------

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
    (root / "done").write_text("generated by support.images.make_sample\n")
    return root


# ============================================================================================
