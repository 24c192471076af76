"""Classify a folder of images with a deployed model: ONNX Runtime, numpy, OpenCV (and tqdm,
which support/ imports), no PyTorch.

A .onnx file of 05_deploy.py carries its preprocessing: the stored size (or native scale) and
the crop in its metadata, the normalisation in its graph. Each image is decoded and centre-
cropped as the pipeline does it, and a predictions file is written: the course's Id,Category
where the files are named by number (0000.jpg), else File,Category; with --class_names=True a
Name column. An image that cannot be read gets its row, no answer, and a warning; other files
in the folder are counted and skipped. Without data/food-11 and --model, the model and images
are the generated sample's, as the stages' were.

    python predict.py --model=checkpoints/final.onnx --folder=data/food-11/testing --out=predictions.csv
"""
from support.running import UserError, quiet_start, run

quiet_start()  # Ctrl-C while onnxruntime loads: a quiet exit

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from support import deploy, images, reports  # noqa: E402
from support.settings import configure  # noqa: E402

# --- settings (each can be overridden as --name=value) -------------------------------------
model = "checkpoints/final.onnx"  # a deployed model (05_deploy.py); without data/food-11, the sample's
folder = "data/food-11/testing"  # the images to classify (.jpg, .jpeg, .png); without data/food-11, the sample's
out = "predictions.csv"  # Id,Category (the course's, for files named by number) or File,Category
class_names = False  # add a Name column with each class's name
batch_size = 64  # images per run of the model
threads = 2  # ONNX Runtime's threads

CHECKPOINTS = "checkpoints"  # where the stages write (the sample's run in checkpoints/sample): a missing model names the final.onnx files here


def images_in(folder):
    """The images of predict's folder in name order, and how many other files it holds."""
    if not Path(folder).is_dir():
        said = "a file, not a folder of images" if Path(folder).exists() else "folder not found"
        raise UserError(f"{folder}: {said}")
    return images.images_in(folder)


def check_model(model):
    """A missing model is one line naming the final.onnx files 05_deploy.py did write."""
    if Path(model).is_file():
        return
    written = sorted(str(p) for p in Path(CHECKPOINTS).rglob("final.onnx"))
    if not written:
        raise UserError(f"{model}: not found; 05_deploy.py writes final.onnx into its ckpt_dir")
    raise UserError(f"{model}: not found; 05_deploy.py wrote {', '.join(written)}: give --model="
                    + (written[0] if len(written) == 1 else "one of them"))


def crop_of(path, stored, native_crop, crop):
    """The uint8 RGB centre crop the model takes, or None for an unreadable image."""
    img = images.decode_native(path, stored, native_crop) if native_crop else images.decode_image(path, stored)
    if img is None:
        return None
    return images.centre_crop(img[0] if native_crop else img, crop)


def classify(sess, meta, paths, batch_size):
    """Each image's class (-1 for an unreadable one, which the model never sees) and the names
    of the unreadable ones."""
    stored, native_crop = images.storage(meta["resize"], meta["img_size"])
    preds, unreadable = np.full(len(paths), -1), []
    for start in range(0, len(paths), batch_size):
        crops = {i: crop_of(paths[i], stored, native_crop, meta["img_size"])
                 for i in range(start, min(start + batch_size, len(paths)))}
        readable = [i for i, img in crops.items() if img is not None]
        unreadable += [paths[i].name for i, img in crops.items() if img is None]
        if readable:
            preds[readable] = deploy.logits(sess, [np.stack([crops[i] for i in readable])]).argmax(1)
    return preds, unreadable


def main():
    cfg = configure(globals())
    if cfg.notice:
        print(cfg.notice)
    check_model(cfg.model)
    sess = deploy.session(cfg.model, cfg.threads)
    meta = deploy.metadata(sess, cfg.model)
    paths, skipped = images_in(cfg.folder)
    preds, unreadable = classify(sess, meta, paths, cfg.batch_size)
    listing = SimpleNamespace(names=[p.name for p in paths], unreadable=unreadable)
    count, bad = reports.write_predictions(Path(cfg.out), listing, preds, unreadable_class=None,
                                           class_names=meta["classes"] if cfg.class_names else None)
    print(f"wrote {cfg.out}: {count} images of {cfg.folder} classified by {Path(cfg.model).name} "
          f"({len(meta['classes'])} classes)" + (f"; {bad} unreadable, no answer" if bad else "")
          + (f"; skipped {skipped} file(s) not .jpg/.jpeg/.png" if skipped else ""))


if __name__ == "__main__":
    run(main)
