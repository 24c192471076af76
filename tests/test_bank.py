"""The teacher bank: replayable views, bank hits equal to the inline teacher, keys, resuming."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision

import common
from support import files, running, settings
from support.images import load_split, native_crop_ranges
from support.bank import TeacherBank
from conftest import run_script


def tiny_images(n=12, size=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen), torch.arange(n) % 3


def test_a_replayed_view_equals_the_view_trained_on_bitwise():
    images, labels = tiny_images()
    aug = common.Augment(16, rotate=15.0, jitter=0.2, seed=3)
    draws = aug.draws(1, len(labels), images.shape[1])
    seen = {}
    for batch in common.train_batches(images, labels, 5, aug, epoch=4, view=1):
        for j, i in enumerate(batch.idx.tolist()):
            alone = aug.apply(images, torch.tensor([i]), draws)[0]  # rebuilt by itself, in another batch
            assert torch.equal(alone, batch.x[j])
            seen[i] = batch.x[j]
    replay = aug.apply(images, torch.arange(len(labels)), aug.draws(1, len(labels), images.shape[1]))
    assert all(torch.equal(replay[i], x) for i, x in seen.items())
    # another epoch on the same view: another order, the same pictures
    other = next(common.train_batches(images, labels, 5, aug, epoch=7, view=1))
    assert all(torch.equal(replay[i], x) for i, x in zip(other.idx.tolist(), other.x))
    # another view: other pictures
    assert not torch.equal(aug.apply(images, torch.arange(4), aug.draws(2, len(labels), 20)), replay[:4])


@pytest.fixture
def bank_setup(sample_root, tmp_path):
    """A tiny data set, a teacher file in a checkpoint folder, and the settings teacher_for reads."""
    root = tmp_path / "food"
    shutil.copytree(sample_root, root)
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(common.make_teacher(11).state_dict(), ckpt / files.TEACHER_FILE)
    cfg = settings.Settings({"img_size": 16, "resize": 18, "rotate": 10.0, "jitter": 0.1, "mix": "none",
                           "mix_alpha": 1.0, "seed": 0, "teacher_bank": True, "teacher_norm": "none", "data_dir": str(root)})
    return root, ckpt, cfg


def bank_for(root, ckpt, cfg, views=range(2), select_fraction=0.0):
    data = common.load_data(root, settings.resize_of(cfg), splits=("training", "validation"),
                            select_fraction=select_fraction)
    aug = common.augment_of(cfg)
    return common.teacher_for(cfg, ckpt, data, aug, torch.device("cpu"), views), data


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_a_bank_hit_gives_the_inline_teachers_loss(bank_setup, mix):
    root, ckpt, cfg = bank_setup
    cfg = cfg.but(mix=mix)
    bank, data = bank_for(root, ckpt, cfg)
    assert bank.images == 2 * len(data.train.labels) and bank.path.exists()
    aug = common.augment_of(cfg)
    inline = common.teacher_for(cfg.but(teacher_bank=False), ckpt, data, aug, torch.device("cpu"), range(2))
    assert isinstance(inline, common.InlineTeacher)
    kd_bank, kd_inline = (common.distill_loss(t, 4.0, 0.5) for t in (bank, inline))
    torch.manual_seed(1)
    student = common.StudentNet(num_classes=11).eval()
    for view in (0, 1):
        for batch in common.train_batches(data.train.images, data.train.labels, 16, aug, 3, view):
            logits = student(common.normalize(batch.x, "imagenet"))
            t_bank, t_inline = bank(batch).float(), inline(batch)
            assert torch.allclose(t_bank, t_inline, rtol=1e-3, atol=1e-3)  # float16 storage
            assert torch.allclose(kd_bank(logits, batch), kd_inline(logits, batch), rtol=1e-3, atol=1e-4)


def test_any_change_builds_a_new_bank_and_the_same_settings_reuse_it(bank_setup, monkeypatch):
    root, ckpt, cfg = bank_setup
    first, _ = bank_for(root, ckpt, cfg)
    paths = {first.path}

    def built(bank):
        assert bank.images == 2 * bank.n and bank.path not in paths, "a changed input must not be served"
        paths.add(bank.path)

    # the same settings: served from the file, the teacher not even loaded
    monkeypatch.setattr(common, "load_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    again, _ = bank_for(root, ckpt, cfg)
    assert again.path == first.path and again.images == 0
    assert all(np.array_equal(again.views[v], first.views[v]) for v in (0, 1))
    copy = root.parent / "food-copy"  # a copied data folder: new file times, the same pixels
    shutil.copytree(root, copy)
    for picture in copy.rglob("*.jpg"):
        os.utime(picture, ns=(10**18, 10**18))
    moved, _ = bank_for(copy, ckpt, cfg.but(data_dir=str(copy)))
    assert moved.path == first.path and moved.images == 0
    monkeypatch.undo()
    for change in ({"img_size": 14}, {"resize": 20}, {"rotate": 5.0}, {"jitter": 0.0}, {"seed": 1},
                   {"teacher_norm": "imagenet"}, {"mix": "mixup"}, {"mix": "cutmix"}, {"mix": "mixup", "mix_alpha": 0.4}):
        built(bank_for(root, ckpt, cfg.but(**change))[0])
    held_out = bank_for(root, ckpt, cfg, select_fraction=0.2)[0]  # the same pixels, fewer of them trained on
    assert held_out.n < first.n
    built(held_out)
    torch.manual_seed(5)  # another teacher file
    torch.save(common.make_teacher(11).state_dict(), ckpt / files.TEACHER_FILE)
    built(bank_for(root, ckpt, cfg)[0])
    picture = root / "training" / "3_1.jpg"  # one training image changed
    picture.write_bytes((root / "training" / "4_1.jpg").read_bytes())
    os.utime(picture, ns=(10**18, 10**18))
    built(bank_for(root, ckpt, cfg)[0])
    (root / "training" / "3_0.jpg").unlink()  # one training image fewer
    fewer = bank_for(root, ckpt, cfg)[0]
    assert fewer.n == first.n - 1
    built(fewer)


def test_an_interrupted_build_resumes_where_it_stopped(bank_setup, monkeypatch):
    root, ckpt, cfg = bank_setup
    monkeypatch.setattr(TeacherBank, "batch_size", 16)
    asked = []
    real_forward = torchvision.models.ResNet.forward

    def forward_then_stop(self, x):
        if len(asked) == 8:  # view 0 is 6 batches of 16 (88 images): stop in view 1, 2 batches in
            raise KeyboardInterrupt
        asked.append(1)
        return real_forward(self, x)
    monkeypatch.setattr(torchvision.models.ResNet, "forward", forward_then_stop)
    with pytest.raises(running.Interrupted, match="keeps what was done"):
        bank_for(root, ckpt, cfg)
    monkeypatch.setattr(torchvision.models.ResNet, "forward", real_forward)
    data = common.load_data(root, 18, splits=("training", "validation"))
    n = len(data.train.labels)
    saved = np.load(next(ckpt.glob("teacher_bank_*.npz")))
    assert len(saved["view_0"]) == n and len(saved["view_1"]) == 32
    resumed, _ = bank_for(root, ckpt, cfg)
    assert resumed.images == n - 32  # only the rest of view 1
    fresh_dir = ckpt.parent / "fresh"
    shutil.copytree(ckpt, fresh_dir, ignore=shutil.ignore_patterns("teacher_bank_*"))
    fresh, _ = bank_for(root, fresh_dir, cfg)
    for v in (0, 1):
        assert np.allclose(resumed.views[v].astype(np.float32), fresh.views[v].astype(np.float32), atol=2e-3)


def test_a_damaged_bank_is_built_again(bank_setup, capsys):
    root, ckpt, cfg = bank_setup
    first, data = bank_for(root, ckpt, cfg, views=range(1))
    first.path.write_bytes(b"not a zip")
    again, _ = bank_for(root, ckpt, cfg, views=range(1))
    assert again.images == len(data.train.labels) and "damaged" in capsys.readouterr().err


def test_pruning_reads_the_bank_distillation_built_and_can_ask_the_teacher_instead(pipeline, tmp_path):
    ckpt, runs, args = pipeline
    assert "asking the teacher about views 0, 1" in runs["02_distill.py"].stdout
    assert "the teacher is not loaded" in runs["03_prune.py"].stdout
    assert "the teacher saw 0 training images" in runs["03_prune.py"].stdout
    for later in ("03_prune.py", "04_quantize.py"):  # on 02's mixed views (its default): the same bank
        assert "teacher_views=2 from student_kd.pt" in runs[later].stdout
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    args = [a for a in args if not a.startswith("--ckpt_dir")] + [f"--ckpt_dir={copy}"]
    run = run_script("03_prune.py", *args, "--prune_count=1", "--finetune_epochs=1", "--max_loss_rise=1e9",
                     "--teacher_bank=False")
    assert run.returncode == 0, run.stderr
    assert "asked about every batch" in run.stdout
    assert "the teacher saw 0 training images" not in run.stdout


def test_later_stages_distil_with_the_teacher_settings_student_kd_records():
    cfg = settings.Settings({"teacher_norm": "none", "teacher_views": 0, "mix": "none", "alpha": 0.5, "temperature": 20.0})
    settings.adopt_teacher_settings(cfg, {"teacher_norm": "imagenet", "views": 10, "mix": "cutmix", "alpha": 1.0,
                                          "temperature": 20.0}, 3)
    assert (cfg.teacher_norm, cfg.teacher_views, cfg.mix, cfg.alpha) == ("imagenet", 10, "cutmix", 1.0)
    assert cfg.provenance() == "settings: teacher_norm=imagenet, mix=cutmix, alpha=1.0, teacher_views=10 from student_kd.pt"
    older = settings.Settings({"teacher_norm": "none", "teacher_views": 0, "mix": "cutmix", "alpha": 1.0,
                               "temperature": 4.0})
    settings.adopt_teacher_settings(older, {"teacher_norm": "imagenet", "views": 10}, 3)  # made before 02 recorded mixing
    assert (older.mix, older.temperature, older.alpha) == ("none", 20.0, 0.5)
    assert "mix=none, temperature=20.0, alpha=0.5 from the defaults of the time" in older.provenance()
    given = settings.Settings({"teacher_norm": "none", "teacher_views": 4}, given={"teacher_norm", "teacher_views"})
    settings.adopt_teacher_settings(given, {"teacher_norm": "imagenet", "views": 10}, 3)
    assert (given.teacher_norm, given.teacher_views) == ("none", 4)
    old = settings.Settings({"teacher_norm": "none", "teacher_views": 0})  # a student_kd.pt that records neither
    settings.adopt_teacher_settings(old, {}, 3)
    assert (old.teacher_norm, old.teacher_views) == ("none", 3)


def test_a_view_is_the_same_in_a_batch_of_one_at_real_size():
    """At real sizes a float32 sum over one image runs in parallel when it is the batch's only
    image; the jitter's mean is exact (common.exact_mean) so the view still comes out the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        images, labels = tiny_images(n=9, size=128)
        aug = common.Augment(112, rotate=10.0, jitter=0.1, seed=0)
        draws = aug.draws(0, 9, 128)
        together = aug.apply(images, torch.arange(9), draws)
        for i in range(9):
            assert torch.equal(aug.apply(images, torch.tensor([i]), draws)[0], together[i]), i
    finally:
        torch.set_num_threads(threads)


def test_a_bank_of_other_view_code_or_precision_is_never_served(bank_setup, monkeypatch):
    root, ckpt, cfg = bank_setup
    first, _ = bank_for(root, ckpt, cfg, views=range(1))
    key = json.loads(first.key)
    assert key["precision"] == "cpu, float32" and len(key["view_code"]) == 16
    assert key["libraries"] == f"torch {torch.__version__}, numpy {np.__version__}"
    # the logits of a GPU run (bf16) stored under this run's file name: read, seen to be another key, rebuilt
    with np.load(first.path, allow_pickle=False) as z:
        views = {k: z[k] for k in z.files if k != "key"}
    np.savez(first.path, key=np.array(json.dumps({**key, "precision": "cuda, bfloat16"}, sort_keys=True)), **views)
    again, _ = bank_for(root, ckpt, cfg, views=range(1))
    assert again.images == again.n
    # the code that makes a view's pixels changed: another bank
    monkeypatch.setattr(common, "view_code_key", lambda: "changed-augment")
    changed, _ = bank_for(root, ckpt, cfg, views=range(1))
    assert changed.path != first.path and changed.images == changed.n


def test_the_pixels_key_survives_the_cache_and_new_file_times(sample_root, tmp_path):
    root = tmp_path / "food"
    shutil.copytree(sample_root, root)
    plain = load_split(root, "training", 18)
    cached = load_split(root, "training", 18, cache_dir=tmp_path / "cache")
    again = load_split(root, "training", 18, cache_dir=tmp_path / "cache")  # read from the cache
    assert plain.key == cached.key == again.key
    for picture in (root / "training").iterdir():
        os.utime(picture, ns=(10**18, 10**18))
    assert load_split(root, "training", 18, cache_dir=tmp_path / "cache").key == plain.key
    (root / "training" / "3_1.jpg").write_bytes((root / "training" / "3_0.jpg").read_bytes())
    assert load_split(root, "training", 18, cache_dir=tmp_path / "cache").key != plain.key


def test_the_view_code_key_covers_the_native_crop_ranges_and_the_teachers_code(monkeypatch):
    """The crop offsets at native scale and torchvision's version (the teacher's code) change the
    logits a bank holds: either changed, another bank."""
    import importlib.metadata
    key = common.view_code_key()

    def other_ranges(shapes, size, crop):  # the same signature, other offsets
        return native_crop_ranges(shapes, size, crop + 1)
    monkeypatch.setattr(common, "native_crop_ranges", other_ranges)
    assert common.view_code_key() != key
    monkeypatch.undo()
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0.1" if name == "torchvision" else version(name))
    assert common.view_code_key() != key
    monkeypatch.undo()
    assert common.view_code_key() == key
