"""Classify a folder of images with a deployed model: ONNX Runtime, numpy, OpenCV (and tqdm,
which support/ imports), no PyTorch.

A .onnx file of 05_deploy.py carries its preprocessing: the stored size (or native scale) and
the crop in its metadata, the normalisation in its graph. Each image is decoded and centre-
cropped as the pipeline does it, and the course's predictions.csv (Id,Category) is written; an
image that cannot be read gets its row, class 0, and a warning.

    python predict.py --model=checkpoints/final.onnx --folder=data/food-11/testing --out=predictions.csv
"""
from support.running import quiet_start, run

quiet_start()  # Ctrl-C while onnxruntime loads: a quiet exit

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from support import deploy, images, reports  # noqa: E402
from support.settings import configure  # noqa: E402

# --- settings (each can be overridden as --name=value) -------------------------------------
model = "checkpoints/final.onnx"  # a deployed model (05_deploy.py)
folder = "data/food-11/testing"  # the images to classify (.jpg, .jpeg, .png)
out = "predictions.csv"  # the course's submission file: Id,Category
batch_size = 64  # images per run of the model
threads = 2  # ONNX Runtime's threads


def crop_of(path, stored, native_crop, crop):
    """The uint8 RGB centre crop the model takes, or None for an unreadable image."""
    img = images.decode_native(path, stored, native_crop) if native_crop else images.decode_image(path, stored)
    if img is None:
        return None
    return images.centre_crop(img[0] if native_crop else img, crop)


def main():
    cfg = configure(globals())
    sess = deploy.session(cfg.model, cfg.threads)
    meta = deploy.metadata(sess, cfg.model)
    where = Path(cfg.folder)
    paths = images.list_images(where.parent, where.name)
    stored, native_crop = images.storage(meta["resize"], meta["img_size"])
    crop, preds, unreadable = meta["img_size"], [], []
    for i in range(0, len(paths), cfg.batch_size):
        batch = []
        for path in paths[i:i + cfg.batch_size]:
            img = crop_of(path, stored, native_crop, crop)
            if img is None:
                unreadable.append(path.name)
                img = np.zeros((crop, crop, 3), np.uint8)
            batch.append(img)
        preds.append(deploy.logits(sess, [np.stack(batch)]).argmax(1))
    listing = SimpleNamespace(names=[p.name for p in paths], unreadable=unreadable)
    count, bad = reports.write_predictions(Path(cfg.out), listing, np.concatenate(preds))
    print(f"wrote {cfg.out}: {count} images of {where} classified by {Path(cfg.model).name} ({len(meta['classes'])} classes)"
          + (f"; {bad} unreadable, class 0" if bad else ""))


if __name__ == "__main__":
    run(main)
