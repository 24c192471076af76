"""Settings: typed --name=value overrides, one-line errors, and an edited constant that always
wins over a preset (the course recipe, the generated sample) and over a checkpoint's record."""
import importlib.util
import json
import shutil
import sys

import pytest

import common
from conftest import REPO
from support import images, running, settings

SETTINGS = {"data_dir": "x", "epochs": 3, "lr": 0.1, "resume": False, "device": "cpu",
            "alpha": 0.5, "__file__": __file__}


def test_overrides_are_typed():
    cfg = settings.configure(SETTINGS, ["--epochs=7", "--lr=2e-3", "--resume=True", "--data_dir=/d"])
    assert (cfg.epochs, cfg.lr, cfg.resume, cfg.data_dir) == (7, 0.002, True, "/d")
    assert settings.configure(SETTINGS, []).epochs == 3


@pytest.mark.parametrize("args, message", [
    (["--epoch=3"], "unknown setting --epoch; settings: data_dir, epochs"),
    (["--epochs=three"], "--epochs takes a whole number"),
    (["--resume=maybe"], "--resume takes True or False"),
    (["epochs=3"], "arguments take the form --name=value"),
    (["--epochs=0"], "--epochs=0 is out of range: it must be at least 1"),
    (["--lr=0"], "greater than 0"),
    (["--alpha=1.5"], "in [0, 1]"),
    (["--device=gpu"], "auto, cpu, cuda"),
    (["--epochs=3", "--epochs=4"], "--epochs is given twice; give it once"),
])
def test_bad_settings_are_one_clear_error(args, message):
    with pytest.raises(running.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings.configure(SETTINGS, args)


def test_a_crop_larger_than_the_stored_size_is_an_error_or_brings_its_own():
    sizes = {"img_size": 224, "resize": 0, "data_dir": "x", "__file__": __file__}
    with pytest.raises(running.UserError, match="resize=30 is smaller than the crop, img_size=48"):
        settings.configure(sizes, ["--img_size=48", "--resize=30"])
    assert settings.configure(sizes, ["--img_size=48"]).resize == 0  # 0: img_size * 8/7


def test_a_crop_size_of_the_users_drops_the_sample_presets_stored_size():
    """On the sample, --img_size=48 kept the preset's resize=36 and crashed deep in training."""
    sizes = {"img_size": 224, "resize": 0, "data_dir": "x", "__file__": __file__}
    given, left = settings.configure(sizes, ["--img_size=48"]), settings.configure(sizes, [])
    for cfg in (given, left):
        settings.apply_preset(cfg, *settings.preset("sample"))
    assert (given.img_size, given.resize) == (48, 0) and (left.img_size, left.resize) == (32, 36)


def test_help_lists_every_setting_with_its_comment_in_one_column(capsys):
    with pytest.raises(SystemExit):
        settings.configure({"epochs": 3, "recipe": "ours", "__file__": str(REPO / "01_architecture.py")}, ["--help"])
    lines = capsys.readouterr().out.splitlines()[3:]
    assert lines[0].startswith("  --epochs=3 ") and "training epochs from scratch" in lines[0]
    assert len({line.index(comment) for line, comment in zip(lines, ("training", "ours, or course"))}) == 1


def test_missing_default_data_falls_back_to_the_sample_but_an_explicit_path_does_not(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "REPO", tmp_path)
    cfg = settings.configure({"data_dir": settings.DEFAULT_DATA_DIR, "epochs": 50, "img_size": 224, "resize": 0}, [])
    assert cfg.data_dir == str(tmp_path / settings.SAMPLE_DIR) and cfg.img_size == 32 and cfg.epochs == 6
    assert cfg.notice == "notice: no data/food-11, so the generated sample in data/sample (--data_dir=PATH for real data)"
    assert cfg.provenance() == "settings: img_size=32, resize=36, epochs=6 from support/presets/sample.py"
    assert not (tmp_path / settings.SAMPLE_DIR).exists()  # nothing is made before the settings are all checked
    common.data_for(cfg, splits=("training", "validation"))
    assert len(list((tmp_path / settings.SAMPLE_DIR / "training").glob("*.jpg"))) == 330
    cfg = settings.configure({"data_dir": settings.DEFAULT_DATA_DIR, "epochs": 50}, ["--epochs=2"])
    assert cfg.epochs == 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # typed paths are taken from the current folder, defaults from the repo
    cfg = settings.configure({"data_dir": settings.DEFAULT_DATA_DIR, "ckpt_dir": "checkpoints"},
                             ["--data_dir=nowhere"])
    assert cfg.data_dir == str(elsewhere / "nowhere") and cfg.ckpt_dir == str(tmp_path / "checkpoints")
    with pytest.raises(running.UserError, match="data folder not found"):
        common.load_data(cfg.data_dir, 12)


def test_predict_follows_the_stages_onto_the_sample(monkeypatch, tmp_path):
    """After the main command without data/food-11, predict.py looked for checkpoints/final.onnx,
    where 05 had written checkpoints/sample/final.onnx."""
    predict = settings.shipped_settings("predict.py")
    script = {**predict, "__file__": str(REPO / "predict.py")}
    monkeypatch.setattr(settings, "REPO", tmp_path)  # no data/food-11 there
    cfg = settings.configure(script, [])
    assert (cfg.model, cfg.folder) == ("checkpoints/sample/final.onnx", "data/sample/testing")
    assert cfg.batch_size == predict["batch_size"] and cfg.notice.startswith("notice: no data/food-11")
    cfg = settings.configure(script, ["--folder=mine"])
    assert (cfg.model, cfg.folder) == ("checkpoints/sample/final.onnx", "mine")
    cfg = settings.configure(script, ["--model=mine.onnx"])
    assert (cfg.model, cfg.folder, cfg.notice) == ("mine.onnx", predict["folder"], "")
    (tmp_path / settings.DEFAULT_DATA_DIR).mkdir(parents=True)
    cfg = settings.configure(script, [])
    assert (cfg.model, cfg.folder, cfg.notice) == (predict["model"], predict["folder"], "")


def test_a_preset_fills_only_what_the_user_left_alone():
    script = {**settings.shipped_settings("02_distill.py"), "__file__": str(REPO / "02_distill.py")}
    cfg = settings.configure({**script, "recipe": "course", "img_size": 96, "data_dir": "x"}, ["--lr=0.01"])
    assert (cfg.img_size, cfg.lr) == (96, 0.01)  # edited in the script, given on the command line
    assert (cfg.resize, cfg.norm, cfg.batch_size, cfg.schedule) == (images.NATIVE, "none", 32, "constant")
    assert cfg.provenance() == (
        "settings: recipe=course, img_size=96, data_dir=x from 02_distill.py (edited); lr=0.01 from the command line; "
        "resize=-1, rotate=15.0, jitter=0.0, mix=none, norm=none, schedule=constant, weight_decay=0.01, batch_size=32, "
        "temperature=20.0, alpha=0.5 from support/presets/course.py")
    assert cfg.said("img_size") == "img_size=96 (set in 02_distill.py)" and cfg.said("lr") == "--lr=0.01"


def test_the_shipped_settings_are_the_scripts():
    """support/shipped.json tells an edited constant from a shipped one: it must be the scripts'
    (after changing a default: python -m support.settings)."""
    recorded = json.loads(settings.SHIPPED.read_text())
    assert set(recorded) == {p.name for p in settings.scripts_with_settings()}
    for path in settings.scripts_with_settings():
        assert settings.settings_in_source(path) == recorded[path.name], path.name


# --- an edited constant always wins: a copy of a script, edited as a user would --------------

def edited_copy(tmp_path, script, **edits):
    """A copy of a stage script under its own name, with constants edited at its top, loaded."""
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    text = (REPO / script).read_text()
    for name, value in edits.items():
        old = f"\n{name} = {literal(settings.shipped_settings(script)[name])}  #"
        assert text.count(old) == 1, old
        text = text.replace(old, f"\n{name} = {literal(value)}  #")
    (folder / script).write_text(text)
    spec = importlib.util.spec_from_file_location("edited_" + script[3:-3], folder / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def literal(value):
    return json.dumps(value) if isinstance(value, str) else repr(value)


def run_main(module, monkeypatch, args):
    monkeypatch.setattr(sys, "argv", [module.__file__, *args])
    running.run(module.main)


def test_an_edited_constant_wins_over_the_course_recipe(pipeline, tmp_path, monkeypatch, capsys):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    distill = edited_copy(tmp_path, "02_distill.py", recipe="course", img_size=20, epochs=1)
    plain = [a for a in args if not a.startswith(("--ckpt_dir", "--img_size", "--resize", "--batch_size"))]
    run_main(distill, monkeypatch, [*plain, f"--ckpt_dir={work}"])
    preprocess = common.load_model(work / "student_kd.pt")[1]
    assert (preprocess["img_size"], preprocess["resize"], preprocess["norm"]) == (20, images.NATIVE, "none")
    out = capsys.readouterr().out
    assert "img_size=20, epochs=1 from 02_distill.py (edited)" in out and "distill epoch   1/1" in out


def test_an_edited_constant_wins_over_the_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(settings, "REPO", tmp_path)  # no data/food-11 there: the sample, made there
    scratch = edited_copy(tmp_path, "01_architecture.py", epochs=2, bench=False, img_size=24)
    run_main(scratch, monkeypatch, [f"--ckpt_dir={tmp_path / 'ck'}", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"])
    out = capsys.readouterr().out
    assert "scratch epoch   2/2" in out and "/6" not in out  # not the sample's 6 epochs
    assert "(27 px stored, 24 px crops)" in out  # its own crop, and the stored size that goes with it
    assert "batch_size=32, mix=none from support/presets/sample.py" in out
    assert "img_size=24, epochs=2, bench=False from 01_architecture.py (edited)" in out


def test_an_edited_constant_wins_over_student_kds_record(pipeline, tmp_path, monkeypatch, capsys):
    ck, _, args = pipeline
    work = tmp_path / "ck"
    shutil.copytree(ck, work)
    prune = edited_copy(tmp_path, "03_prune.py", img_size=20, prune_count=1, finetune_epochs=1)
    plain = [a for a in args if not a.startswith(("--ckpt_dir", "--img_size", "--resize"))]
    run_main(prune, monkeypatch, [*plain, f"--ckpt_dir={work}", "--max_loss_rise=1e9"])
    out = capsys.readouterr().out
    assert "note: student_kd.pt was made with img_size=16; using img_size=20 (set in 03_prune.py)" in out
    assert "(23 px stored, 20 px crops)" in out
    assert common.load_model(work / "student_pruned.pt")[1]["img_size"] == 20
