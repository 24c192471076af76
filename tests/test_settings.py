import pytest

import common

SETTINGS = {"data_dir": "x", "epochs": 3, "lr": 0.1, "resume": False, "device": "cpu",
            "alpha": 0.5, "__file__": __file__}


def test_overrides_are_typed():
    cfg = common.configure(SETTINGS, ["--epochs=7", "--lr=2e-3", "--resume=True", "--data_dir=/d"])
    assert (cfg.epochs, cfg.lr, cfg.resume, cfg.data_dir) == (7, 0.002, True, "/d")
    assert common.configure(SETTINGS, []).epochs == 3


@pytest.mark.parametrize("arg, message", [
    ("--epoch=3", "unknown setting --epoch; settings: data_dir, epochs"),
    ("--epochs=three", "--epochs takes a whole number"),
    ("--resume=maybe", "--resume takes True or False"),
    ("epochs=3", "arguments take the form --name=value"),
    ("--epochs=0", "--epochs=0 is out of range: it must be at least 1"),
    ("--lr=0", "greater than 0"),
    ("--alpha=1.5", "in [0, 1]"),
    ("--device=gpu", "auto, cpu, cuda"),
])
def test_bad_settings_are_one_clear_error(arg, message):
    with pytest.raises(common.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        common.configure(SETTINGS, [arg])


def test_help_lists_every_setting_with_its_comment(capsys):
    with pytest.raises(SystemExit):
        common.configure({"epochs": 3, "__file__": str(common.REPO / "01_architecture.py")}, ["--help"])
    assert "--epochs=3" in capsys.readouterr().out


def test_missing_default_data_falls_back_to_the_sample_but_an_explicit_path_does_not(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "REPO", tmp_path)
    cfg = common.configure({"data_dir": common.DEFAULT_DATA_DIR, "epochs": 50, "img_size": 224, "resize": 0}, [])
    assert cfg.data_dir == str(tmp_path / common.SAMPLE_DIR) and cfg.img_size == 32 and cfg.epochs == 6
    assert cfg.notice.startswith("notice: no data/food-11, so a generated sample with img_size=32, resize=36")
    assert not (tmp_path / common.SAMPLE_DIR).exists()  # nothing is made before the settings are all checked
    common.data_for(cfg, splits=("training", "validation"))
    assert len(list((tmp_path / common.SAMPLE_DIR / "training").glob("*.jpg"))) == 330
    cfg = common.configure({"data_dir": common.DEFAULT_DATA_DIR, "epochs": 50}, ["--epochs=2"])
    assert cfg.epochs == 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # typed paths are taken from the current folder, defaults from the repo
    cfg = common.configure({"data_dir": common.DEFAULT_DATA_DIR, "ckpt_dir": "checkpoints"},
                           ["--data_dir=nowhere"])
    assert cfg.data_dir == str(elsewhere / "nowhere") and cfg.ckpt_dir == str(tmp_path / "checkpoints")
    with pytest.raises(common.UserError, match="data folder not found"):
        common.load_data(cfg.data_dir, 12)
