"""The two figures: validation accuracy of the pruning rounds against their size (03), and every
file's accuracy against its bytes (04). matplotlib, drawn off screen (Agg)."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter  # noqa: E402

from support import files  # noqa: E402

BLUE, GREY, RED = "#1f5fbf", "#9a9a9a", "#d62728"


def save_png(path, fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    files.atomic_write(path, lambda f: f.write(buf.getvalue()))


def log_x(ax, title, values):
    """A log-scaled x axis of byte or parameter counts, ticked at 1, 2 and 5 times powers of ten
    (every multiple, where the values span less than a factor of 10)."""
    ax.set_xscale("log")
    narrow = max(values) < 10 * min(values)
    ax.xaxis.set_major_locator(LogLocator(subs=tuple(range(1, 10)) if narrow else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{title} (log scale)")


def label_points(ax, points, texts):
    """Labels beside points, alternately above and below, so neighbours do not overlap."""
    for i, ((x, y), text) in enumerate(sorted(zip(points, texts))):
        ax.annotate(text, (x, y), xytext=(6, 7 if i % 2 == 0 else -13), textcoords="offset points", fontsize=8)


def plot_rounds(path, rows, kd):
    """Two panels, validation accuracy against parameters and against file bytes (log scales):
    each round just pruned and after fine-tuning (with its 95% interval), and student_kd.
    rows: {keep, params, bytes, acc_before, acc_after, ci_after}; kd: {params, bytes, acc}."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout="constrained")
    for ax, (key, title) in zip(axes, (("params", "parameters"), ("bytes", "file bytes (.pt)"))):
        xs = [r[key] for r in rows]
        ax.scatter(xs, [r["acc_before"] for r in rows], facecolors="none", edgecolors=GREY, label="just pruned")
        after = [r["acc_after"] for r in rows]
        errors = [[a - r["ci_after"][0] for a, r in zip(after, rows)], [r["ci_after"][1] - a for a, r in zip(after, rows)]]
        ax.errorbar(xs, after, yerr=errors, fmt="o", color=BLUE, capsize=3, label="after fine-tuning (95% CI)")
        ax.scatter([kd[key]], [kd["acc"]], marker="*", s=160, color=RED, zorder=3, label="student_kd")
        label_points(ax, list(zip(xs, after)), [f"keep {r['keep']:.2f}" for r in rows])
        log_x(ax, title, xs + [kd[key]])
        ax.set_title(f"validation accuracy vs {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    save_png(path, fig)


def plot_frontier(path, files, kd_acc, final):
    """Validation accuracy against file bytes (log scale): every file, the front (no smaller
    file is as accurate) joined and labelled, the final file ringed, student_kd's accuracy a line.
    files: {bytes, acc, label, front}; final: one of them."""
    fig, ax = plt.subplots(figsize=(9, 5.6), layout="constrained")
    front = sorted((f for f in files if f["front"]), key=lambda f: f["bytes"])
    rest = [f for f in files if not f["front"]]
    ax.scatter([f["bytes"] for f in rest], [f["acc"] for f in rest], color=GREY, s=20, label="other files")
    ax.plot([f["bytes"] for f in front], [f["acc"] for f in front], "o-", color=BLUE, label="the front")
    label_points(ax, [(f["bytes"], f["acc"]) for f in front], [f["label"] for f in front])
    ax.axhline(kd_acc, color=RED, linestyle="--", linewidth=1, label=f"student_kd ({kd_acc:.3f})")
    ax.scatter([final["bytes"]], [final["acc"]], s=220, facecolors="none", edgecolors=RED, linewidths=2,
               label=f"final file: {final['label']}")
    log_x(ax, "file bytes", [f["bytes"] for f in files])
    ax.set_ylabel("validation accuracy")
    ax.set_title("every file: validation accuracy vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_png(path, fig)


def plot_epochs(path, curves, teacher):
    """Validation accuracy against training epochs, one line per student (with 95% intervals),
    the teacher's accuracy a line. curves: {name: [(epochs, acc, (lo, hi)), ...]}; teacher: acc."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for (name, points), colour in zip(curves.items(), (BLUE, GREY)):
        points = sorted(points)
        xs, accs = [p[0] for p in points], [p[1] for p in points]
        errors = [[a - p[2][0] for a, p in zip(accs, points)], [p[2][1] - a for a, p in zip(accs, points)]]
        ax.errorbar(xs, accs, yerr=errors, fmt="o-", color=colour, capsize=3, label=f"{name} (95% CI)")
    ax.axhline(teacher, color=RED, linestyle="--", linewidth=1, label=f"teacher ({teacher:.3f})")
    ax.set_xlabel("training epochs")
    ax.set_ylabel("validation accuracy")
    ax.set_title("patience: validation accuracy vs epochs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_png(path, fig)
