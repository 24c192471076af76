"""The course's recipe: native-scale crops, the course's files at their scale, recipe=course."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

import common
from support import files, images, running, settings
from conftest import FAST, REPO, run_script

SHAPES = [(384, 512), (512, 384), (200, 300)]  # height, width: landscape, portrait, smaller than the crop


@pytest.fixture
def photos(tmp_path):
    """Real-size PNG photos (lossless, so OpenCV and PIL read the same pixels) in a split folder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "food" / "validation"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(SHAPES):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i}_0.png"), img)
    return tmp_path / "food"


def course_eval(path, crop):
    """torchvision's CenterCrop + ToTensor; a side shorter than the crop mirrored first (the
    rule native scale documents: RandomCrop's pad_if_needed padding, not CenterCrop's black)."""
    img = Image.open(path).convert("RGB")
    pad_w, pad_h = max(0, crop - img.width), max(0, crop - img.height)
    if pad_w or pad_h:
        img = TF.pad(img, [pad_w, pad_h], padding_mode="symmetric")
    return transforms.ToTensor()(transforms.CenterCrop(crop)(img))


def test_native_evaluation_crops_are_torchvisions_center_crop(photos):
    crop = 256
    size, native_crop = images.storage(images.NATIVE, crop)
    split = images.load_split(photos, "validation", size, native_crop=native_crop)
    assert split.images.shape[1:] == (384, 384, 3)
    assert split.native.tolist() == [list(s) for s in SHAPES]
    x, _ = next(common.eval_batches(split.images, split.labels, 8, crop))
    for i in range(len(SHAPES)):
        expected = course_eval(photos / "validation" / f"{i}_0.png", crop)
        assert torch.allclose(x[i], expected, atol=1e-6), SHAPES[i]
    # the big ones are exactly CenterCrop (no padding involved)
    img = Image.open(photos / "validation" / "0_0.png").convert("RGB")
    assert torch.allclose(x[0], transforms.ToTensor()(transforms.CenterCrop(crop)(img)), atol=1e-6)


@pytest.mark.parametrize("shape", [(255, 257), (251, 300), (201, 301), (60, 90)])
def test_odd_and_tiny_images_follow_the_documented_padding_rule(tmp_path, shape):
    folder = tmp_path / "food" / "validation"
    folder.mkdir(parents=True)
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.uint8)
    cv2.imwrite(str(folder / "0_0.png"), img)
    split = images.load_split(tmp_path / "food", "validation", 384, native_crop=256)
    x, _ = next(common.eval_batches(split.images, split.labels, 1, 256))
    assert torch.allclose(x[0], course_eval(folder / "0_0.png", 256), atol=1e-6)


def test_native_training_crops_range_as_the_courses_random_crop(photos):
    crop = 256
    split = images.load_split(photos, "validation", 384, native_crop=crop)
    lo, hi = split.crop_ranges(crop)
    # (384, 512): every row offset of the image, the centre 384 columns of its 512
    # (512, 384): the centre 384 rows, every column; (200, 300): rows into the mirrored padding
    assert lo.T.tolist() == [[0, 0], [0, 0], [36, 42]]
    assert hi.T.tolist() == [[128, 128], [128, 128], [92, 86]]
    aug = common.Augment(crop)  # crop and flip only
    for view in range(6):
        draws = aug.draws(view, 3, 384, (lo, hi))
        assert ((draws["off"] >= lo) & (draws["off"] <= hi)).all()
        x = aug.apply(split.images, torch.arange(3), draws)
        for i, (h, w) in enumerate(SHAPES):
            img = cv2.imread(str(photos / "validation" / f"{i}_0.png"))[:, :, ::-1]
            pad_h, pad_w = max(0, crop - h), max(0, crop - w)
            padded = np.pad(img, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="symmetric")
            top, left = (int(draws["off"][k, i]) + images.canvas_origin(n, 384, crop) + pad
                         for k, (n, pad) in enumerate(((h, pad_h), (w, pad_w))))
            window = torch.from_numpy(padded[top:top + crop, left:left + crop].copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(x[i], window.flip(2) if draws["flip"][i] else window), (view, SHAPES[i])
            # inside the course's range: the whole image, or the padded strip of a short side
            assert 0 <= top <= padded.shape[0] - crop and 0 <= left <= padded.shape[1] - crop


def test_recipe_course_sets_the_homeworks_choices_and_each_stays_overridable():
    script = {"data_dir": "x", "img_size": 224, "resize": 0, "rotate": 10.0, "jitter": 0.1, "lr": 3e-3,
                "batch_size": 64, "norm": "imagenet", "schedule": "onecycle", "recipe": "ours"}
    cfg = settings.configure(script, ["--recipe=course", "--batch_size=8"])
    assert (cfg.img_size, cfg.resize, cfg.rotate, cfg.jitter, cfg.lr, cfg.norm, cfg.schedule) == \
        (256, images.NATIVE, 15.0, 0.0, 1e-3, "none", "constant")
    distill = {**settings.shipped_settings("02_distill.py"), "__file__": str(REPO / "02_distill.py"), "data_dir": "x"}
    course = settings.configure(distill, ["--recipe=course"])
    assert (course.mix, course.temperature, course.alpha) == ("none", 20.0, 0.5)  # not 02's CutMix, T=4, alpha=1
    assert cfg.batch_size == 8  # given wins
    assert settings.configure(script, []).img_size == 224  # ours by default
    with pytest.raises(running.UserError, match="ours or course"):
        settings.configure(script, ["--recipe=homework"])
    with pytest.raises(running.UserError, match="-1"):
        settings.configure(script, ["--resize=-2"])


def test_a_plain_state_dict_with_no_normalisation_is_native_scale(tmp_path):
    torch.save(common.StudentNet(num_classes=3).state_dict(), tmp_path / "s.bin")
    assert common.load_model(tmp_path / "s.bin", plain_norm="none")[1] == {"norm": "none", "resize": images.NATIVE}
    assert common.load_model(tmp_path / "s.bin", plain_norm="imagenet")[1] == {"norm": "imagenet"}


def test_the_courses_teacher_file_makes_distillation_native_unless_told(sample_root, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save(common.make_teacher(11).state_dict(), ck / files.TEACHER_FILE)  # no note: the course's file
    args = [f"--data_dir={sample_root}", f"--ckpt_dir={ck}", f"--cache_dir={tmp_path / 'cache'}",
            "--img_size=16", "--batch_size=16", "--device=cpu", "--epochs=1"]
    run = run_script("02_distill.py", *args)
    assert run.returncode == 0, run.stderr
    assert "native-scale crops (resize=-1)" in run.stdout
    assert "16 px centre crops, native scale, [0,1], no normalisation" in run.stdout  # the teacher's line
    assert common.load_model(ck / "student_kd.pt")[1]["resize"] == images.NATIVE
    told = run_script("02_distill.py", *args, "--resize=18")
    assert told.returncode == 0, told.stderr
    assert "native-scale" not in told.stdout and "shorter side resized to 18" in told.stdout
    assert common.load_model(ck / "student_kd.pt")[1]["resize"] == 18
    # 03 reads the scale student_kd.pt records
    ck2 = tmp_path / "ck2"
    ck2.mkdir()
    for name in (files.TEACHER_FILE,):
        (ck2 / name).write_bytes((ck / name).read_bytes())
    assert run_script("02_distill.py", *[a.replace(str(ck), str(ck2)) for a in args]).returncode == 0
    pruned = run_script("03_prune.py", *[a.replace(str(ck), str(ck2)) for a in args if a != "--epochs=1"],
                        "--prune_count=1", "--finetune_epochs=1", "--max_loss_rise=1e9")
    assert pruned.returncode == 0, pruned.stderr
    assert common.load_model(ck2 / "student_pruned.pt")[1]["resize"] == images.NATIVE


def test_the_course_recipe_runs_end_to_end_on_the_sample(sample_root, tmp_path):
    args = [f"--data_dir={sample_root}", f"--ckpt_dir={tmp_path / 'ck'}", f"--cache_dir={tmp_path / 'cache'}",
            "--recipe=course", "--img_size=16", "--device=cpu"]
    assert run_script("00_teacher.py", *args[:3], *FAST, "--epochs=1").returncode == 0
    for script, extra in [("02_distill.py", ["--epochs=1"]), ("03_prune.py", ["--prune_count=1", "--finetune_epochs=1"]),
                          ("04_quantize.py", [])]:
        run = run_script(script, *args, *extra)
        assert run.returncode == 0, (script, run.stderr)
    _, preprocess, _ = common.load_model(tmp_path / "ck" / "student_kd.pt")
    assert (preprocess["norm"], preprocess["resize"], preprocess["img_size"]) == ("none", images.NATIVE, 16)
    assert "q8c" not in run.stdout and "student_pruned.q8" in run.stdout  # per tensor 8-bit and fp16 only
