"""Resumable states: a training run interrupted (Ctrl-C, kill -9) goes on where it stopped with
--resume=True, and a state is checked against the run before any work."""
import hashlib
from pathlib import Path

import torch

from support.files import atomic_torch_save, new_path, torch_load
from support.images import training_key
from support.running import UserError


def resume_path(ckpt_path):
    return Path(ckpt_path).with_name(Path(ckpt_path).name + ".resume.pt")


# The settings that shape a training run: a resumable state records them, and resuming under
# other values is refused (or, for a value not given, the recorded one is used).
RUN_SHAPE = ("epochs", "finetune_epochs", "sparsity_epochs", "batch_size", "lr", "weight_decay",
             "label_smoothing", "img_size", "resize", "rotate", "jitter", "mix", "mix_alpha", "seed", "select_fraction",
             "temperature", "alpha", "sparsity", "base", "width_mult", "from_scratch", "teacher_norm",
             "use_teacher", "teacher_views", "norm", "schedule", "qat_epochs", "qat_lr")


class Resumable:
    """Where a training run keeps its last finished epoch (`<path>.new`) and its resumable state
    (`<path>.resume.pt`), whether it resumes, and the settings that shaped it."""

    def __init__(self, path, cfg):
        self.path, self.resume = Path(path), bool(cfg.get("resume"))
        self.best, self.state = new_path(path), resume_path(path)
        self.settings = {k: cfg[k] for k in RUN_SHAPE if k in cfg}

    def load(self, training):
        """The state to resume from, after checking it is this run's (the settings, and what
        `training` describes: the loop's arguments, the data, the starting weights); or None."""
        if not (self.resume and self.state.exists()):
            if self.resume:
                print(f"nothing to resume at {self.state}; starting from epoch 1")
            return None
        state = read_state(self.state)
        for recorded, now in ((state["shape"], self.settings), (state["training"], training)):
            for name, value in now.items():
                if recorded.get(name) != value:
                    what = ("another starting model" if name == "start" and recorded is state["training"]
                            else f"{name}={recorded.get(name)}, this run has {name}={value}")
                    raise UserError(f"{self.state}: made with {what}; delete it or run without --resume=True")
        if not self.best.exists():
            raise UserError(f"{self.state}: its best model {self.best.name} is missing; run without --resume=True")
        return state

    def save(self, state, training):
        atomic_torch_save({**state, "shape": self.settings, "training": training}, self.state)


def read_state(state_path):
    state = torch_load(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("shape"), dict) \
            or not isinstance(state.get("training"), dict):
        raise UserError(f"{state_path}: not a resumable state of this version; delete it or run "
                        "without --resume=True")
    return state


def check_resume(cfg, *ckpt_paths):
    """Before any work: each resumable state of these outputs must have been made with these
    settings. A value of the user's that differs is an error naming both; a value the user
    left alone is taken from the state, and said."""
    if not cfg.get("resume"):
        return
    for state_path in map(resume_path, ckpt_paths):
        if not state_path.exists():
            continue
        state = read_state(state_path)
        shape = state["shape"]
        if state["training"].get("data") != training_key(cfg.data_dir):
            raise UserError(f"{state_path.name} was made on other training files than {cfg.data_dir}'s; "
                            "give the --data_dir it was made on, or run without --resume=True")
        if not new_path(state_path.with_name(state_path.name.removesuffix(".resume.pt"))).exists():
            raise UserError(f"{state_path}: the best model it goes with is missing; run without --resume=True")
        differ = {name: old for name, old in shape.items() if name in cfg and cfg[name] != old}
        for name, old in differ.items():
            if name in cfg.given:
                raise UserError(f"{cfg.said(name)}, but {state_path.name} was made with {name}={old}; "
                                f"give --{name}={old} to resume it, or run without --resume=True")
        for name, old in differ.items():
            cfg.fill(name, old, state_path.name)


def weights_key(model):
    """A key of a model's weights: what a resumable state started from."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def restore(state, state_path, model, opt, sched):
    """Load a resumable state into the run's objects; (epochs done, best metrics)."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return state["epoch"], dict(state["best"])
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise UserError(f"{state_path}: damaged or of another model; delete it or run "
                        "without --resume=True") from None
