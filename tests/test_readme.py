"""The README's sample table is what its main command prints: the command is run, exactly as
written, in a clean copy of the repository (no data/food-11, so the generated sample)."""
import re
import shutil
import subprocess
import sys

from conftest import REPO
from support import files, reports

SAMPLE_TABLE_HEAD = "| model | params | bytes | val acc [95% CI] |"


def sample_table(ckpt_dir):
    """The README's sample table, rendered from a finished run's results log."""
    by_name = {r["model"]: r for r in files.read_results(ckpt_dir)}
    final = by_name["final"]
    final_model = by_name[final["file"].removesuffix(".z.npz").removesuffix(".npz").removesuffix(".pt")]
    rows = [("teacher ResNet18 (trained from scratch: no ImageNet weights offline)", by_name["teacher_resnet18"]),
            ("student from scratch", by_name["student_scratch"]), ("student distilled", by_name["student_kd"]),
            (f"pruned, keep {by_name['student_pruned']['keep']} (`student_pruned.pt`)", by_name["student_pruned"]),
            (f"final model: `{final['file']}`", {**final, "params": final_model["params"]})]
    lines = [SAMPLE_TABLE_HEAD, "|---|---:|---:|---|"]
    lines += [f"| {name} | {r['params']:,} | {r['bytes']:,} | {reports.recorded_score(r)} |" for name, r in rows]
    return "\n".join(lines)


def main_command():
    """The README's main command, as written there."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(r"```\n(python 00_teacher\.py && [^\n]+)\n```", text).group(1)


def test_the_readme_sample_table_is_what_the_main_command_prints(tmp_path):
    clean = tmp_path / "repo"
    clean.mkdir()
    for path in [*REPO.glob("*.py"), REPO / "support"]:
        copy = shutil.copytree if path.is_dir() else shutil.copy
        copy(path, clean / path.name)
    command = main_command().replace("python ", f"{sys.executable} ")
    run = subprocess.run(command, shell=True, cwd=clean, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    table = sample_table(clean / "checkpoints" / "sample")
    assert table in (REPO / "README.md").read_text(encoding="utf-8"), f"the README's sample table is now:\n{table}"
