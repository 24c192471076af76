import importlib.util
import os
import subprocess
import sys
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


def run_script(name, *args, timeout=300, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """11 learnable classes, 8 training and 4 validation images each, 24 px."""
    return common.make_sample(tmp_path_factory.mktemp("data") / "food", per_class=(8, 4),
                              test_count=13, size=24)


@pytest.fixture
def fast_args(sample_root, tmp_path):
    return [f"--data_dir={sample_root}", f"--ckpt_dir={tmp_path / 'ck'}",
            f"--cache_dir={tmp_path / 'cache'}", *FAST]
