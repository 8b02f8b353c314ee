"""Pictures of runs: accuracy and loss per round, accuracy against traffic, a partition's split.

Every function takes plain data (metrics rows as in ``metrics.jsonl``, a partition report as in
``partitions.json``) and writes PNG files; nothing here reads a config or a run directory. The
figures are drawn with matplotlib's object API on an Agg canvas, so plotting never touches the
process's pyplot state or backend. Each file is written atomically (a reader never sees half a PNG).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

ACCURACY_LOSS = "accuracy_loss.png"
ACCURACY_VS_MB = "accuracy_vs_mb.png"
ACCURACY_VS_ROUND = "accuracy_vs_round.png"
PARTITIONS = "partitions.png"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def cumulative_mb(row: Mapping[str, Any]) -> float:
    """Traffic up to and including this round, both directions, in MB (10^6 bytes)."""
    return ((row.get("cumulative_bytes_up") or 0) + (row.get("cumulative_bytes_down") or 0)) / 1e6


def _evaluated(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("test_accuracy") is not None]


def run_plots(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """One run's ``accuracy_loss.png`` (accuracy; test and train loss, per round) and
    ``accuracy_vs_mb.png`` (accuracy against cumulative traffic) in ``out_dir``."""
    out_dir = Path(out_dir)
    evaluated = _evaluated(rows)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    acc_ax.plot([r["round"] for r in evaluated], [100 * r["test_accuracy"] for r in evaluated], marker="o")
    acc_ax.set(xlabel="round", ylabel="test accuracy (%)", title="global model, held-out test split")
    for key, label in (("test_loss", "test loss (global model)"), ("train_loss", "train loss (clients, weighted)")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker="o", label=label)
    loss_ax.set(xlabel="round", ylabel="loss")
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend()
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    paths = [_save(fig, out_dir / ACCURACY_LOSS)]

    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([cumulative_mb(r) for r in evaluated], [100 * r["test_accuracy"] for r in evaluated], marker="o")
    ax.set(xlabel="cumulative traffic, up + down (MB)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / ACCURACY_VS_MB))
    return paths


def mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[tuple[int, float, float, float]]:
    """(round, mean cumulative MB, mean accuracy, std of accuracy) over runs, for every round
    that each run evaluated; std is the sample standard deviation (0 for a single run)."""
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rows in runs:
        for row in _evaluated(rows):
            by_round.setdefault(int(row["round"]), []).append(row)
    curve = []
    for rnd in sorted(by_round):
        rows = by_round[rnd]
        if len(rows) < len(runs):
            continue
        accs = [r["test_accuracy"] for r in rows]
        curve.append(
            (
                rnd,
                statistics.mean(cumulative_mb(r) for r in rows),
                statistics.mean(accs),
                statistics.stdev(accs) if len(accs) > 1 else 0.0,
            )
        )
    return curve


def overlay_plots(groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], out_dir: Path) -> list[Path]:
    """``accuracy_vs_round.png`` and ``accuracy_vs_mb.png``: one curve per group (label -> the
    rows of each of its runs), the mean over its runs with a ±1 std band."""
    out_dir = Path(out_dir)
    paths = []
    for name, x_index, xlabel in (
        (ACCURACY_VS_ROUND, 0, "round"),
        (ACCURACY_VS_MB, 1, "cumulative traffic, up + down (MB)"),
    ):
        fig = Figure(figsize=(6.5, 4), layout="constrained")
        ax = fig.subplots()
        for label, runs in groups.items():
            curve = mean_curve(runs)
            if not curve:
                continue
            xs = [c[x_index] for c in curve]
            mean = [100 * c[2] for c in curve]
            std = [100 * c[3] for c in curve]
            line = ax.plot(xs, mean, marker="o", label=f"{label} (n={len(runs)})")[0]
            if len(runs) > 1:
                ax.fill_between(
                    xs,
                    [m - s for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set(xlabel=xlabel, ylabel="test accuracy (%), mean ± std")
        if x_index == 0:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        paths.append(_save(fig, out_dir / name))
    return paths


def partition_plot(report: Mapping[str, Any], path: Path) -> Path:
    """A horizontal stacked bar per client: its training examples, coloured by label."""
    clients = report["clients"]
    labels = report["label_names"]
    fig = Figure(figsize=(7, 1.4 + 0.32 * len(clients)), layout="constrained")
    ax = fig.subplots()
    names = [f"client {c['partition']}" for c in clients]
    left = [0] * len(clients)
    for j, label in enumerate(labels):
        counts = [c["label_counts"][j] for c in clients]
        ax.barh(names, counts, left=left, label=label)
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set(xlabel="training examples", title=report.get("title", "partition of the training data"))
    fig.legend(fontsize="small", ncols=min(len(labels), 5), loc="outside lower center")
    return _save(fig, Path(path))
