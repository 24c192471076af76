"""Settings: the lowercase constants at the top of a script, each overridable as --name=value.

Where a value comes from, strongest first:
  1. the command line (--name=value), or the constant edited at the top of the script: the
     user's own value, always used;
  2. a checkpoint's record (03 and 04 adopt student_kd.pt's preprocessing), then a preset
     (the generated sample's, then recipe = "course"): these fill in only what the
     user left alone;
  3. the constant as the script ships it.
A constant counts as edited when it differs from the value the script shipped with, which
shipped.json records for every script (tests/test_settings.py keeps it in step with them).
"""
import ast
import importlib
import json
import re
import sys
from pathlib import Path

from support import files
from support.images import NATIVE
from support.running import UserError, warn

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(__file__).with_name("shipped.json")
DEFAULT_DATA_DIR = "data/food-11"
SAMPLE_DIR = "data/sample"
DEFAULT_MODEL = "checkpoints/final.onnx"  # predict.py's
PATHS = ("data_dir", "ckpt_dir", "cache_dir")

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
    "channel_multiple": (lambda v: v >= 1, "at least 1 (1 = exact counts)"),
    "max_acc_drop": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_loss_rise": (lambda v: v >= 0, "at least 0"),
    "max_bytes": (lambda v: v >= 0, "at least 0 (0 = no budget)"),
    "choose_by": (lambda v: v in ("loss", "acc"), "loss or acc"),
    "sparsity": (lambda v: v >= 0, "at least 0"),
    "rotate": (lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
    "jitter": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "mix": (lambda v: v in ("none", "mixup", "cutmix"), "none, mixup or cutmix"),
    "mix_alpha": (lambda v: v > 0, "greater than 0"),
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
    "repeats": (lambda v: v >= 1, "at least 1"),
    "threads": (lambda v: v >= 1, "at least 1"),
    "calibration_images": (lambda v: v >= 1, "at least 1"),
    "min_agreement": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


class Settings(dict):
    """A dict whose keys read as attributes (cfg.epochs), that knows which values are the
    user's (`given`: the command line's and the edited constants) and where each value that
    is not the script's own came from (`sources`)."""
    __getattr__ = dict.__getitem__

    def __setattr__(self, name, value):  # cfg.epochs = 3 sets the setting that cfg.epochs reads
        if name in self:
            self[name] = value
        else:
            super().__setattr__(name, value)

    def __init__(self, values, given=(), notice="", sources=None, script=""):
        super().__init__(values)
        self.given, self.notice, self.script = set(given), notice, script
        self.sources = dict(sources or {})
        self.shown = {name: self[name] for name in self.sources}  # as the user or the preset wrote it

    def but(self, **changes):
        """A copy with some values changed (tests use it to vary one setting)."""
        return Settings({**self, **changes}, self.given, self.notice, self.sources, self.script)

    def said(self, name):
        """How the user gave a setting: `--name=value`, or `name=value (set in <script>)`."""
        if self.sources.get(name) == "the command line" or not self.script:
            return f"--{name}={self[name]}"
        return f"{name}={self[name]} (set in {self.script})"

    def fill(self, name, value, source):
        """A value from a record or a preset, for a setting the user left alone."""
        if name in self and name not in self.given and value != self[name]:
            self[name] = self.shown[name] = value
            self.sources[name] = source

    def provenance(self):
        """One line: which values came from where (nothing when every value is the script's)."""
        by_source = {}
        for name, source in self.sources.items():
            by_source.setdefault(source, []).append(f"{name}={self.shown.get(name, self[name])}")
        parts = [f"{', '.join(values)} from {source}" for source, values in by_source.items()]
        return "settings: " + "; ".join(parts) if parts else ""


# ---- reading a script's settings --------------------------------------------------------------

def settings_of(namespace):
    """The settings of a script: its lowercase constants of a plain type, in order."""
    return {k: v for k, v in namespace.items()
            if k.islower() and not k.startswith("_") and type(v) in (bool, int, float, str)}


def settings_in_source(path):
    """The settings a script's file assigns at its top level (read without running it)."""
    values = {}
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return settings_of(values)


def shipped_settings(script, names=None):
    """The values `script` (a file name) ships with; for a renamed copy, those of the script
    with the same settings (`names`); None for a script we do not know."""
    try:
        table = json.loads(SHIPPED.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if script in table or names is None:
        return table.get(script)
    same = [values for values in table.values() if set(values) == set(names)]
    return same[0] if len(same) == 1 else None


def setting_help(script_path):
    """name -> comment, read from the `name = value  # comment` lines of a script."""
    text = Path(script_path).read_text(encoding="utf-8")
    return dict(re.findall(r"^([a-z_0-9]+) = .*?  # (.*)$", text, flags=re.M))


def preset(name):
    """The settings a preset file (support/presets/<name>.py) assigns, and how to name it."""
    module = importlib.import_module(f"support.presets.{name}")
    return settings_of(vars(module)), f"support/presets/{name}.py"


# ---- the command line -------------------------------------------------------------------------

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


def parse_args(argv, cfg, script_path):
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(script_path, cfg)
            sys.exit(0)
        m = re.fullmatch(r"--([A-Za-z_0-9]+)=(.*)", arg, flags=re.S)
        if not m:
            raise UserError(f"arguments take the form --name=value, got {arg!r}; settings: {', '.join(cfg)}")
        name, text = m.groups()
        if name not in cfg:
            raise UserError(f"unknown setting --{name}; settings: {', '.join(cfg)}")
        if name in given:
            raise UserError(f"--{name} is given twice; give it once")
        given[name] = parse_value(name, text, cfg[name])
    return given


def parse_list(text, name, pattern=None, allow_empty=False, what=""):
    """A comma-separated setting's items, each matching `pattern` (described as `what`)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if (not items and not allow_empty) or (pattern and not all(re.fullmatch(pattern, t) for t in items)):
        raise UserError(f"--{name}={text!r}: give a comma-separated list" + (f" of {what}" if what else ""))
    return items


def print_help(script_path, cfg):
    notes = setting_help(script_path)
    flags = {name: f"--{name}={value!r}" for name, value in cfg.items()}
    width = max(map(len, flags.values()), default=0)
    print(f"usage: python {Path(script_path).name} [--name=value ...]\n\nsettings:")
    for name, flag in flags.items():
        print(f"  {flag:<{width}}  {notes.get(name, '')}")


# ---- configure: the settings a run uses -------------------------------------------------------

def configure(namespace, argv=None):
    """The final settings of a script: its constants, the user's own values (the command line's
    and the constants edited in the script) over the presets' and, without data/food-11 and
    --data_dir, the generated sample's preset. Every value is checked here, before any work."""
    argv = sys.argv[1:] if argv is None else argv
    script_path = namespace.get("__file__", sys.argv[0])
    script = Path(script_path).name
    cfg = settings_of(namespace)
    given = parse_args(argv, cfg, script_path)
    shipped = shipped_settings(script, cfg)
    if shipped is None and ("recipe" in cfg or cfg.get("data_dir") == DEFAULT_DATA_DIR):
        warn(f"{script} is not a script support/shipped.json knows: its constants are taken as shipped, so a "
             "preset or a record may replace them; give your values as --name=value")
    edited = [k for k, v in cfg.items() if shipped is not None and k in shipped and shipped[k] != v and k not in given]
    cfg = Settings({**cfg, **given}, given={*given, *edited}, script=script if shipped else "",
                   sources={**{k: f"{script} (edited)" for k in edited}, **{k: "the command line" for k in given}})
    if cfg.get("recipe") == "course":
        apply_preset(cfg, *preset("course"))
    if on_the_sample(cfg) and "data_dir" in cfg:
        apply_preset(cfg, *preset("sample"))
        cfg.data_dir = SAMPLE_DIR
        cfg.notice = (f"notice: no {DEFAULT_DATA_DIR}, so the generated sample in {SAMPLE_DIR} "
                      "(--data_dir=PATH for real data)")
    elif on_the_sample(cfg):
        predict_the_sample(cfg)
    check(cfg)
    if "device" in cfg:
        pick_device(cfg.device)  # a missing GPU is said now, not after the first stage of work
    for name in PATHS:
        if cfg.get(name):  # a path typed on the command line is taken from where the user is
            cfg[name] = str(resolve(cfg[name], Path.cwd() if cfg.sources.get(name) == "the command line" else REPO))
    return cfg


def on_the_sample(cfg):
    """No data/food-11 and no data of the user's: the stages run on the generated sample, and
    predict.py, unless given a model, on what they made of it."""
    name, default = ("data_dir", DEFAULT_DATA_DIR) if "data_dir" in cfg else ("model", DEFAULT_MODEL)
    return cfg.get(name) == default and name not in cfg.given and not (REPO / DEFAULT_DATA_DIR).is_dir()


def predict_the_sample(cfg):
    """predict.py after a run on the sample: the model 05_deploy.py made of it (in the sample's
    ckpt_dir) on the sample's test images, each unless the user chose it."""
    values, source = preset("sample")
    cfg.fill("model", f"{values['ckpt_dir']}/final.onnx", source)
    cfg.fill("folder", f"{SAMPLE_DIR}/testing", source)
    cfg.notice = (f"notice: no {DEFAULT_DATA_DIR}, so the generated sample's model {cfg.model} on {cfg.folder} "
                  "(--model=PATH, --folder=PATH for others)")


def apply_preset(cfg, values, source):
    """A preset's values for the settings this script has and the user left alone. A preset's
    stored size belongs to its crop size: a crop size of the user's brings its own."""
    for name, value in values.items():
        if name == "resize" and value != NATIVE and "img_size" in cfg.given:
            continue
        cfg.fill(name, value, source)


def check(cfg):
    for name, value in cfg.items():
        rule = CHECKS.get(name)
        if rule and not rule[0](value):
            raise UserError(f"{cfg.said(name)} is out of range: it must be {rule[1]}")
    if cfg.get("resize", 0) > 0 and "img_size" in cfg and cfg.resize < cfg.img_size:
        raise UserError(f"resize={cfg.resize} is smaller than the crop, img_size={cfg.img_size}: give "
                        "--resize=0 (img_size * 8/7), a size of at least img_size, or -1 (native scale)")


def resolve(path, base):
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


# ---- settings a checkpoint recorded: preprocessing travels with every model -------------------

def resize_of(cfg):
    return cfg.resize or round(cfg.img_size * 8 / 7)


def adopt_recorded(cfg, record, source, names=("img_size", "resize", "select_fraction")):
    """Settings a checkpoint recorded fill those the user left alone; a value of the user's
    that differs from the record is used, and one line says so."""
    for name in names:
        if name not in cfg or record.get(name) is None:
            continue
        if name in cfg.given:
            if cfg[name] != record[name] and name == "select_fraction" and not cfg.get("other_selection"):
                raise UserError(f"{source} was made with select_fraction={record[name]}, this run has "
                                f"{cfg.said(name)}: another selection split chooses on images {source} may have "
                                "been trained on; give --other_selection=True to do it all the same")
            if cfg[name] != record[name] and not (name == "resize" and resize_of(cfg) == record[name]):
                print(f"note: {source} was made with {name}={record[name]}; using {cfg.said(name)}")
        elif not (name == "resize" and "img_size" in cfg.given and record[name] != NATIVE):
            # a new crop size brings its own resize; native scale is no size, so it stays
            cfg.fill(name, record[name], source)


def check_selection(selection, recorded, source, allowed=False):
    """A model made with another selection split than the one choosing now (another
    select_fraction, or other training files) may have trained on the images that would choose:
    an error, or with `allowed` (--other_selection=True) a warning."""
    if "select_fraction" not in recorded or selection == {k: recorded.get(k) for k in selection}:
        return
    said = (f"{source} was made with the selection split select_fraction={recorded.get('select_fraction')} "
            f"(files key {recorded.get('select_key')}), this run's is select_fraction={selection['select_fraction']} "
            f"(files key {selection['select_key']}): its images may have been trained on")
    if not allowed:
        raise UserError(f"{said}; give --other_selection=True to choose on them all the same")
    warn(said)


def adopt_from(cfg, path, made_by, names=("img_size", "resize", "select_fraction")):
    """The settings checkpoint `path` records (preprocessing, selection split) fill those the
    user left alone (adopt_recorded). Returns the record, named."""
    obj = files.torch_load(path, made_by)
    record = obj.get("preprocess", {}) if isinstance(obj, dict) and "arch" in obj else {}
    adopt_recorded(cfg, record, Path(path).name, names)
    return {**record, "source": Path(path).name, "metrics": obj.get("metrics", {}) if isinstance(obj, dict) else {}}


def as_given(cfg, preprocess):
    """A model's recorded preprocessing, but with the sizes the user chose."""
    if {"img_size", "resize"} & cfg.given:
        return {**preprocess, "img_size": cfg.img_size, "resize": resize_of(cfg)}
    return preprocess


def course_scale(cfg, ckpt_dir):
    """The course's files were trained on native-scale crops in [0,1]. A teacher file without a
    note, read with teacher_norm=none (their convention), is therefore used at native scale:
    this run's resize becomes -1 unless the user chose one. Said in one line."""
    if "resize" in cfg.given or cfg.resize == NATIVE or cfg.teacher_norm != "none" \
            or not (Path(ckpt_dir) / files.TEACHER_FILE).exists() or files.teacher_note(ckpt_dir) is not None:
        return
    cfg.fill("resize", NATIVE, f"{files.TEACHER_FILE} (no note, teacher_norm=none: the course's scale)")
    print(f"note: {files.TEACHER_FILE} has no note and teacher_norm=none, the course's convention, so it is "
          "used as the course trained it: native-scale crops (resize=-1); --resize=0 resizes instead")


def describe_preprocess(preprocess, cfg):
    """What a model sees, in words: crop, scale, normalisation."""
    crop = preprocess.get("img_size") or cfg.img_size
    resize = preprocess.get("resize") or resize_of(cfg)
    scale = "native scale" if resize == NATIVE else f"shorter side resized to {resize}"
    norm = "ImageNet mean/std" if preprocess["norm"] == "imagenet" else "[0,1], no normalisation"
    return f"{crop} px centre crops, {scale}, {norm}"


DISTILLED_WITH = ("teacher_norm", "rotate", "jitter", "mix", "mix_alpha", "temperature", "alpha", "seed")  # what 02 records for 03 and 04


# 02 recorded its mixing and loss only from 2026-12-01: a student_kd.pt from before was distilled
# unmixed, and 03 and 04 then used 02's defaults of the time for the loss
BEFORE_RECORDED = {"mix": "none", "temperature": 20.0, "alpha": 0.5}


def adopt_teacher_settings(cfg, kd_metrics, views_otherwise):
    """03 and 04 distil as 02 did, on the same teacher bank: the teacher's norm, the augmentation
    (mixing included), the loss's temperature and alpha, the seed and the number of views, as
    student_kd.pt records them (each unless the user chose it). Called before check_resume, which may still prefer a state's."""
    older = bool(kd_metrics) and "mix" not in kd_metrics
    for name in DISTILLED_WITH:
        if name in cfg and kd_metrics.get(name) is not None:
            cfg.fill(name, kd_metrics[name], "student_kd.pt")
        elif name in cfg and older and name in BEFORE_RECORDED:
            cfg.fill(name, BEFORE_RECORDED[name], "the defaults of the time (student_kd.pt records no mixing or loss)")
    if not cfg.teacher_views and kd_metrics.get("views"):
        cfg.fill("teacher_views", kd_metrics["views"], "student_kd.pt")
    cfg.teacher_views = cfg.teacher_views or views_otherwise


def pick_device(name):
    import torch  # here, not above: predict.py reads settings without PyTorch
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


def write_shipped(scripts):
    """Record the settings each script ships with (run after changing a default:
    python -m support.settings)."""
    table = {Path(s).name: settings_in_source(s) for s in scripts}
    SHIPPED.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    return table


def scripts_with_settings():
    return sorted(p for p in REPO.glob("*.py") if "configure(globals()" in p.read_text(encoding="utf-8"))


if __name__ == "__main__":
    print(f"{SHIPPED}: " + ", ".join(write_shipped(scripts_with_settings())))
