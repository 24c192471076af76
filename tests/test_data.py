import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
from support import images, running
from conftest import SHARED_DATA


def write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def tiny_root(root, per_class=2, classes=3):
    for split in ("training", "validation"):
        for c in range(classes):
            for n in range(per_class):
                write(root / split / f"{c}_{n}.jpg", np.full((20, 30, 3), (20 * c + n) % 256, np.uint8))
    return root


def test_labels_come_from_the_file_name(tmp_path):
    assert images.parse_label(tmp_path / "7_123.jpg") == 7
    assert images.parse_label(tmp_path / "10_0.png") == 10
    with pytest.raises(running.UserError, match="integer class"):
        images.parse_label(tmp_path / "bread_1.jpg")


def test_split_is_one_uint8_tensor_of_centre_squares(tmp_path):
    data = common.load_data(tiny_root(tmp_path), 12)
    assert data.train.images.shape == (6, 12, 12, 3) and data.train.images.dtype == torch.uint8
    assert sorted(data.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert data.num_classes == 3 and data.class_names == ["class 0", "class 1", "class 2"]
    assert data.test is None


def test_class_names_from_classes_txt_or_food11(tmp_path):
    root = tiny_root(tmp_path / "a")
    (root / "classes.txt").write_text("x\ny\nz\nw\n")
    assert common.load_data(root, 12).class_names == ["x", "y", "z", "w"]
    root = tiny_root(tmp_path / "b", per_class=1, classes=11)
    assert common.load_data(root, 12).class_names == images.FOOD11_CLASSES


@pytest.mark.parametrize("break_it, message", [
    (lambda r: shutil.rmtree(r), "data folder not found"),
    (lambda r: shutil.rmtree(r / "validation"), "split folder missing"),
    (lambda r: [p.unlink() for p in (r / "training").iterdir()], "no .jpg/.jpeg/.png images"),
    (lambda r: write(r / "training" / "bread_1.jpg", np.zeros((9, 9, 3), np.uint8)), "integer class"),
    (lambda r: (r / "classes.txt").write_text("a\nb\n"), "outside classes.txt"),
    (lambda r: [p.write_bytes(b"") for p in (r / "validation").iterdir()], "no readable image left"),
])
def test_bad_data_is_one_clear_error(tmp_path, break_it, message):
    root = tiny_root(tmp_path / "food")
    break_it(root)
    with pytest.raises(running.UserError, match=message):
        common.load_data(root, 12)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, capsys):
    root = tiny_root(tmp_path)
    (root / "training" / "0_90.jpg").write_bytes(b"")
    (root / "training" / "0_91.jpg").write_bytes(b"not an image at all")
    good = (root / "training" / "1_0.jpg").read_bytes()
    (root / "training" / "1_92.jpg").write_bytes(good[: len(good) // 2])  # truncated
    data = common.load_data(root, 12)
    assert len(data.train.labels) == 6
    err = capsys.readouterr().err
    for name in ("0_90.jpg", "0_91.jpg", "1_92.jpg"):
        assert err.count(name) == 1


def test_odd_modes_and_huge_images_simply_work(tmp_path):
    root = tiny_root(tmp_path)
    write(root / "training" / "0_10.png", np.full((30, 20), 200, np.uint8))              # grey
    write(root / "training" / "0_11.png", np.full((30, 20, 4), 90, np.uint8))            # RGBA
    write(root / "training" / "0_12.png", np.full((30, 20, 3), 60000, np.uint16))        # 16 bit
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "training" / "0_13.jpg")   # CMYK red
    write(root / "training" / "0_14.jpg", np.full((4000, 6000, 3), 10, np.uint8))        # huge
    data = common.load_data(root, 12)
    names = data.train.names
    img = lambda n: data.train.images[names.index(n)]
    assert len(names) == 11
    assert int(img("0_10.png")[6, 6, 0]) == 200
    assert int(img("0_12.png")[6, 6, 0]) == 60000 >> 8
    red = img("0_13.jpg")[6, 6].tolist()
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_second_load_hits_the_cache_and_a_change_misses_it(tmp_path, monkeypatch):
    root, cache = tiny_root(tmp_path / "food"), tmp_path / "cache"
    first = common.load_data(root, 12, cache_dir=cache)
    calls = []
    monkeypatch.setattr(images, "decode_split", lambda *a: calls.append(a) or pytest.fail("decoded"))
    again = common.load_data(root, 12, cache_dir=cache)
    assert torch.equal(first.train.images, again.train.images) and not calls
    monkeypatch.undo()
    write(root / "training" / "2_0.jpg", np.full((20, 30, 3), 250, np.uint8))
    os.utime(root / "training" / "2_0.jpg", ns=(1, 1))
    changed = common.load_data(root, 12, cache_dir=cache)
    assert int(changed.train.images[changed.train.names.index("2_0.jpg")][0, 0, 0]) > 240
    assert len(list(cache.glob("*training*"))) == 1   # the stale copy is gone


def test_batches_are_augmented_whole_and_centre_cropped_for_eval():
    images = torch.arange(4 * 10 * 10 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 10, 10, 3)
    labels = torch.arange(4)
    x, y = next(common.train_batches(images, labels, 4, common.Augment(8, 10, 0.2), 0, 0))[:2]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, y = next(common.train_batches(images, labels, 4, common.Augment(8), 1, 1))[:2]
    for xi, yi in zip(x, y):  # without rotation/jitter every crop is an exact (maybe flipped) window
        src = images[yi].permute(2, 0, 1).float() / 255
        windows = [src[:, r:r + 8, c:c + 8] for r in range(3) for c in range(3)]
        assert any(torch.equal(xi, w) or torch.equal(xi, w.flip(2)) for w in windows)
    x, _ = next(common.eval_batches(images, labels, 4, 8))
    assert torch.equal(x[0], images[0, 1:9, 1:9].permute(2, 0, 1).float() / 255)


def test_folded_jitter_equals_the_three_steps_one_after_another():
    x = torch.rand(6, 3, 9, 9) * 0.9
    factors = 1 + (torch.rand(3, 6) * 2 - 1) * 0.4
    b, c, s = factors.view(3, 6, 1, 1, 1)
    y = x * b
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    grey = 0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:]
    y = ((y - grey) * s + grey).clamp(0, 1)
    assert torch.allclose(common.jitter_batch(x, factors), y, atol=1e-6)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/food101-10 not present")
def test_food101_10_loads(tmp_path):
    data = common.load_data(SHARED_DATA, 40, cache_dir=tmp_path)
    assert data.num_classes == 10
    assert len(data.train.labels) == 3000 and len(data.val.labels) == 750
    assert len(data.test.labels) == 1250
    assert torch.bincount(data.train.labels).tolist() == [300] * 10
