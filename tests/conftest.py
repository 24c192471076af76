import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "food101-10"
# Tiny and fast: 16 px crops on CPU, caches and checkpoints under the test's own tmp folder.
FAST = ["--img_size=16", "--resize=18", "--batch_size=16", "--device=cpu"]


def load_script(name):
    """Import a numbered stage script (its name starts with a digit) as a module."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").lstrip("0123456789_"),
                                                  REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overridden(args):
    """Tests build a run's flags from shared lists: a later --name=value replaces an earlier one
    (a script refuses a setting given twice)."""
    last = {a.split("=", 1)[0]: i for i, a in enumerate(args)}
    return [a for i, a in enumerate(args) if last[a.split("=", 1)[0]] == i]


HANG = 1800  # seconds: a guard against a hung stage, not a speed test (a loaded 2-core machine is slow)
UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a stage's lines reach the test as they are printed


def start(script, args):
    """A stage running in the background, to interrupt or kill."""
    return subprocess.Popen([sys.executable, str(REPO / script), *overridden(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=UNBUFFERED)


def wait_for(path, proc, timeout=HANG):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def snapshot(folder):
    """file name -> SHA-1 of its bytes, for every file in a folder."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def run_script(name, *args, timeout=HANG, **kw):
    return subprocess.run([sys.executable, str(REPO / name), *overridden(args)], capture_output=True, text=True,
                          timeout=timeout, env=UNBUFFERED, **kw)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """11 learnable classes, 8 training and 4 validation images each, 24 px."""
    return common.make_sample(tmp_path_factory.mktemp("data") / "food", per_class=(8, 4),
                              test_count=13, size=24)


@pytest.fixture
def fast_args(sample_root, tmp_path):
    return [f"--data_dir={sample_root}", f"--ckpt_dir={tmp_path / 'ck'}",
            f"--cache_dir={tmp_path / 'cache'}", *FAST]


@pytest.fixture(scope="session")
def pipeline(sample_root, tmp_path_factory):
    """A checkpoint folder after a whole 00..04 run on the tiny sample: (folder, runs, args)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    args = [f"--data_dir={sample_root}", f"--ckpt_dir={tmp / 'ck'}", f"--cache_dir={tmp / 'cache'}",
            "--img_size=16", "--resize=18", "--batch_size=16", "--device=cpu"]
    runs = {}
    for script, extra in [("00_teacher.py", ["--epochs=1"]),
                          ("01_architecture.py", ["--epochs=2", "--bench=False", "--mix=none"]),
                          ("02_distill.py", ["--epochs=2", "--sparsity=1e-4"]),
                          ("03_prune.py", ["--prune_count=2", "--finetune_epochs=1", "--max_loss_rise=1e9"]),
                          ("04_quantize.py", ["--variants=fp16,q8,q4c", "--qat_variants=mix3",
                                              "--qat_epochs=1", "--max_loss_rise=1e9"])]:
        runs[script] = run_script(script, *args, *extra)
        assert runs[script].returncode == 0, runs[script].stderr
    return tmp / "ck", runs, args
