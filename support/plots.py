"""The two figures: validation accuracy of the pruning rounds against their size (03), and every
file's accuracy against its bytes (04). matplotlib, drawn off screen (Agg)."""
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import EngFormatter, FixedLocator, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

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


def space_tick_labels(ax):
    """Keep a log x axis's tick labels apart, as drawn: powers of ten labelled first, then 2 and 5
    times them, then the others, each only where it touches no label already kept (a tick
    dropped here stays as an unlabelled minor tick)."""
    renderer = draw(ax.figure)
    lo, hi = sorted(ax.get_xlim())
    ticks = [(v, t.get_window_extent(renderer).padded(4)) for v, t in
             zip(ax.xaxis.get_majorticklocs(), ax.xaxis.get_majorticklabels()) if lo <= v <= hi and t.get_text()]

    def rank(value):
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return mantissa != 1, mantissa not in (2, 5), value
    kept = []
    for value, box in sorted(ticks, key=lambda t: rank(t[0])):
        if not any(box.overlaps(other) for _, other in kept):
            kept.append((value, box))
    ax.xaxis.set_major_locator(FixedLocator(sorted(v for v, _ in kept)))


def label_points(ax, points, texts):
    """Labels beside points, right of them (left in the axes' right quarter), the lowest placed
    first and each moved up just clear of the labels and points below it (down, where up would
    leave the axes), in display space as drawn; a label moved off its point is joined to it by a
    thin line. Call it last: what is drawn after may move the points."""
    renderer = draw(ax.figure)
    area = ax.get_window_extent(renderer)
    taken = [Bbox.from_bounds(*ax.transData.transform(xy) - 4, 8, 8) for xy in points]  # the markers
    for xy, text in sorted(zip(points, texts), key=lambda p: (p[0][1], p[0][0])):
        left = ax.transData.transform(xy)[0] > area.x0 + 0.75 * area.width
        style = {"textcoords": "offset points", "fontsize": 8, "va": "center", "ha": "right" if left else "left",
                 "bbox": {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}}
        probe = ax.annotate(text, xy, xytext=(-9 if left else 9, 0), **style)
        box = probe.get_window_extent(renderer).padded(2)
        probe.remove()
        shift = clear_shift(box, taken, up=True)
        if box.y1 + shift > area.y1:  # above the axes: below the point instead, where that fits
            down = clear_shift(box, taken, up=False)
            shift = down if box.y0 + down >= area.y0 else shift
        taken.append(box.translated(0, shift))
        points_up = shift * 72 / ax.figure.dpi
        note = ax.annotate(text, xy, xytext=(-9 if left else 9, points_up), **style,
                           arrowprops={"arrowstyle": "-", "color": GREY, "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3}
                           if abs(points_up) > 6 else None)
        note.set_in_layout(False)  # the layout the labels were placed in stays


def clear_shift(box, taken, up):
    """How far to move `box` up (or down) until it overlaps none of `taken`."""
    shift = 0.0
    while hit := next((b for b in taken if b.overlaps(box.translated(0, shift))), None):
        shift = hit.y1 - box.y0 + 0.01 if up else hit.y0 - box.y1 - 0.01
    return shift


def draw(fig):
    """Lay out and draw `fig` (off screen); its renderer, to measure what is drawn."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def with_interval(ax, points, colour, **style):
    """Points (x, acc, (lo, hi)) with their 95% intervals as error bars."""
    xs, accs = [p[0] for p in points], [p[1] for p in points]
    errors = [[a - p[2][0] for a, p in zip(accs, points)], [p[2][1] - a for a, p in zip(accs, points)]]
    return ax.errorbar(xs, accs, yerr=errors, color=colour, **style)


def plot_rounds(path, rows, kd, kept=None):
    """Two panels, validation accuracy against parameters and against file bytes (log scales):
    each round just pruned and after fine-tuning (with its 95% interval), the round kept ringed,
    and student_kd. rows: {keep, params, bytes, acc_before, acc_after, ci_after}; kd: {params,
    bytes, acc}; kept: one of rows."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout="constrained")
    for ax, (key, title) in zip(axes, (("params", "parameters"), ("bytes", "file bytes (.pt)"))):
        xs = [r[key] for r in rows]
        ax.scatter(xs, [r["acc_before"] for r in rows], facecolors="none", edgecolors=GREY, label="just pruned")
        with_interval(ax, [(r[key], r["acc_after"], r["ci_after"]) for r in rows], BLUE, fmt="o", capsize=3,
                      label="after fine-tuning (95% CI)")
        ax.scatter([kd[key]], [kd["acc"]], marker="*", s=160, color=RED, zorder=3, label="student_kd")
        if kept:
            ax.scatter([kept[key]], [kept["acc_after"]], s=220, facecolors="none", edgecolors=RED, linewidths=2,
                       zorder=3, label=f"kept: keep {kept['keep']:.2f} (student_pruned.pt)")
        log_x(ax, title, xs + [kd[key]])
        ax.set_title(f"validation accuracy vs {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    for ax in axes:
        space_tick_labels(ax)
    for ax, key in zip(axes, ("params", "bytes")):
        label_points(ax, [(r[key], r["acc_after"]) for r in rows], [f"keep {r['keep']:.2f}" for r in rows])
    save_png(path, fig)


def plot_frontier(path, files, kd_acc, final, named=(), teacher_acc=None):
    """Validation accuracy against file bytes (log scale), each file with its 95% interval: the
    front (no smaller file is as accurate) joined, the final file ringed, student_kd's and the
    teacher's accuracies lines. Labelled: the front, the final file and `named` (the files a
    reader compares them with); the other files are grey dots. files: {bytes, val (a Score),
    label, front}; final, named: some of them."""
    def point(f):
        return f["bytes"], f["val"].acc, f["val"].interval()
    fig, ax = plt.subplots(figsize=(9, 5.6), layout="constrained")
    front = sorted((f for f in files if f["front"]), key=lambda f: f["bytes"])
    rest = [f for f in files if not f["front"]]
    with_interval(ax, [point(f) for f in rest], GREY, fmt="o", markersize=4, linewidth=0.8,
                  alpha=0.6, label="other files (95% CI)")
    with_interval(ax, [point(f) for f in front], BLUE, fmt="o-", capsize=3, label="the front (95% CI)")
    ax.axhline(kd_acc, color=RED, linestyle="--", linewidth=1, label=f"student_kd ({kd_acc:.3f})")
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="black", linestyle=":", linewidth=1, label=f"teacher ({teacher_acc:.3f})")
    ax.scatter([final["bytes"]], [final["val"].acc], s=220, facecolors="none", edgecolors=RED, linewidths=2,
               zorder=3, label=f"final file: {final['label']}")
    log_x(ax, "file bytes", [f["bytes"] for f in files])
    ax.set_ylabel("validation accuracy")
    ax.set_title("every file: validation accuracy vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    space_tick_labels(ax)
    labelled = list({id(f): f for f in [*front, final, *named]}.values())
    label_points(ax, [point(f)[:2] for f in labelled], [f["label"] for f in labelled])
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
