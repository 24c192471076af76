"""The README's sample table is what its main command prints: the command is run, exactly as
written, in a clean copy of the repository (no data/food-11, so the generated sample).

Another CPU rounds differently (its kernels, its threads) and so trains other models from the
same seed: the table's numbers are compared where the machine's arithmetic is that of the one
they were measured on (README_ARITHMETIC); elsewhere, with a warning, its shape, the untrained
sizes, and that every stage learned."""
import re
import shutil
import subprocess
import sys
import warnings

from conftest import HANG, REPO
from support import files, reports

SAMPLE_TABLE_HEAD = "| model | params | bytes | val acc [95% CI] |"
README_ARITHMETIC = "ff9ed3af07623270"  # arithmetic_key() where the README's sample table was measured

ARITHMETIC = """
import hashlib, torch, torch.nn as nn, torch.nn.functional as F, torchvision
torch.manual_seed(0)
student = nn.Sequential(  # StudentNet's kinds of layer, written here so that no change to our code moves the key
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(), nn.MaxPool2d(2),
    nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 32, 1), nn.MaxPool2d(2),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 11))
h = hashlib.sha1()
for model in (student, torchvision.models.resnet18(num_classes=11)):
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        x, y = torch.rand(16, 3, 64, 64).contiguous(memory_format=torch.channels_last), torch.randint(0, 11, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        opt.step()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
print(h.hexdigest()[:16], torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
"""


def arithmetic_key(repo):
    """A digest of a few training steps of layers like the student's and of the teacher, run in a
    fresh process with default threads, and the torch, vector unit and thread count it ran on.
    It runs no code of ours: a change to our training changes the table, not this key, so on the
    machine the table was measured on a stale table fails the test."""
    run = subprocess.run([sys.executable, "-c", ARITHMETIC], cwd=repo, capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


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
    run = subprocess.run(command, shell=True, cwd=clean, capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr
    table = sample_table(clean / "checkpoints" / "sample")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    key, *machine = arithmetic_key(clean)
    if key == README_ARITHMETIC:
        assert table in readme, f"the README's sample table is now:\n{table}"
    else:  # measured elsewhere: the same rows, and the sizes no training changes
        start = readme.index(SAMPLE_TABLE_HEAD, readme.index("## On the generated sample"))
        written = readme[start:readme.index("\n\n", start)]
        assert [shape(line) for line in table.splitlines()] == [shape(line) for line in written.splitlines()], (
            f"the README's sample table, on this machine (arithmetic {key}):\n{table}")
        for mine, theirs in zip(table.splitlines()[2:5], written.splitlines()[2:5]):
            assert untrained(mine) == untrained(theirs)
        accuracies = [float(line.split("|")[4].split()[0]) for line in table.splitlines()[2:]]
        assert min(accuracies) > 0.5, f"a stage learned little (11 classes):\n{table}"
        warnings.warn(f"the README's sample table was compared by shape only: this machine's arithmetic is "
                      f"{key} (torch {' / '.join(machine)}), the table's {README_ARITHMETIC}")


def shape(line):
    """A table line with its numbers and file names blanked."""
    return re.sub(r"`[^`]*`", "`F`", re.sub(r"\d[\d,.]*", "N", line))


def untrained(line):
    """A teacher/student row's name, parameter count and file bytes (not its accuracy)."""
    return line.rsplit("|", 2)[0]
