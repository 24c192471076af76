"""The house: stages -> common.py -> support/, never back, and every file a reader can take in."""
import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

STAGES = sorted(p.name for p in REPO.glob("0[0-9]_*.py"))
SUPPORT = sorted((REPO / "support").rglob("*.py"))


def imported(path):
    """The top-level module names a file imports, and the files it loads by path."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("spec_from_file_location",
                                                                            "import_module", "run_path")):
            names |= {a.value for a in node.args if isinstance(a, ast.Constant) and a.value in STAGES}
    return names


@pytest.mark.parametrize("path", SUPPORT, ids=lambda p: p.name)
def test_support_knows_nothing_of_common_or_the_stages(path):
    names = imported(path)
    assert "common" not in names and not names & set(STAGES) and "benchmark" not in names


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_never_imports_another(stage):
    assert not imported(REPO / stage) & {s for s in STAGES if s != stage}


def test_common_imports_no_stage():
    assert not imported(REPO / "common.py") & set(STAGES)


@pytest.mark.parametrize("path, limit", [(REPO / "common.py", 700)] + [(REPO / s, 300) for s in STAGES]
                         + [(p, 450) for p in SUPPORT], ids=lambda x: getattr(x, "name", str(x)))
def test_every_file_is_short_enough_to_read(path, limit):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= limit


def test_every_method_function_opens_with_its_method():
    """One sentence of the method first, the way a course would explain it."""
    docs = {"common.py": {"kd_loss": "alpha * T^2 * KL(softmax(t/T) || softmax(s/T))"},
            "03_prune.py": {"slim_counts": "Network slimming: in each group g of `counts`, keep the counts[g] channels"},
            "04_quantize.py": {"minmax_quantize": "code = round((x - min) / (max - min) * (2^bits - 1))"}}
    for name, functions in docs.items():
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
        found = {f.name: ast.get_docstring(f) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        for function, phrase in functions.items():
            assert phrase in " ".join(found[function].split("\n\n")[0].split()), (name, function)


def test_the_predictor_imports_no_pytorch():
    """predict.py ships beside an .onnx file: onnxruntime, numpy and OpenCV only (tests/test_deploy.py
    runs it where importing torch fails)."""
    assert not imported(REPO / "predict.py") & {"torch", "torchvision", "common", *STAGES}


def test_every_timeout_in_the_tests_is_a_hang_guard_not_a_speed_test():
    """A loaded 2-core machine ran the README's main command in 6.5 minutes: a subprocess
    timeout under conftest.HANG fails a slow machine, not a hung stage."""
    from conftest import HANG
    short = [(path.name, int(seconds)) for path in (REPO / "tests").glob("*.py")
             for seconds in re.findall(r"timeout=(\d+)", path.read_text(encoding="utf-8")) if int(seconds) < HANG]
    assert not short, short
