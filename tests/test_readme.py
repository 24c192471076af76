"""The README's sample table is what its main command prints: the command is run, exactly as
written, in a clean copy of the repository (no data/food-11, so the generated sample).

Another CPU rounds differently (its kernels, its threads) and so trains other models from the
same seed: the table's numbers are compared where the machine's arithmetic is that of the one
they were measured on (README_ARITHMETIC), its shape and the untrained sizes everywhere."""
import re
import shutil
import subprocess
import sys

from conftest import REPO
from support import files, reports

SAMPLE_TABLE_HEAD = "| model | params | bytes | val acc [95% CI] |"
README_ARITHMETIC = "ea1a1d694f275b7c"  # arithmetic_key() where the README's sample table was measured

ARITHMETIC = """
import hashlib, torch, torch.nn.functional as F, common
torch.manual_seed(0)
h = hashlib.sha1()
for model, size in ((common.StudentNet(num_classes=11), 32), (common.make_teacher(11), 32)):
    model = common.prepare(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        x, y = torch.rand(16, 3, size, size), torch.randint(0, 11, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
print(h.hexdigest()[:16])
"""


def arithmetic_key(repo):
    """A digest of a few training steps of the student and the teacher, run as the pipeline runs
    (a fresh process, default threads): equal on two machines whose training repeats bit for bit."""
    run = subprocess.run([sys.executable, "-c", ARITHMETIC], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


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
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    key = arithmetic_key(clean)
    if key == README_ARITHMETIC:
        assert table in readme, f"the README's sample table is now:\n{table}"
    else:  # measured elsewhere: the same rows, and the sizes no training changes
        start = readme.index(SAMPLE_TABLE_HEAD, readme.index("## On the generated sample"))
        written = readme[start:readme.index("\n\n", start)]
        assert [shape(line) for line in table.splitlines()] == [shape(line) for line in written.splitlines()], (
            f"the README's sample table, on this machine (arithmetic {key}):\n{table}")
        for mine, theirs in zip(table.splitlines()[2:5], written.splitlines()[2:5]):
            assert untrained(mine) == untrained(theirs)


def shape(line):
    """A table line with its numbers and file names blanked."""
    return re.sub(r"`[^`]*`", "`F`", re.sub(r"\d[\d,.]*", "N", line))


def untrained(line):
    """A teacher/student row's name, parameter count and file bytes (not its accuracy)."""
    return line.rsplit("|", 2)[0]
