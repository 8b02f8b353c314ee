"""A results table from finished runs: ``python -m fedpeft.report <run dirs or a multirun dir> [--out DIR]``.

Runs are grouped by the settings that differ between them — the command-line overrides in each
run's ``.hydra/overrides.yaml`` when every run has them, otherwise the resolved ``config.yaml`` —
leaving out ``seed`` (and paths such as ``resume``), so a group's runs are its seeds. Per group:
final and best test accuracy and final test loss as mean ± std over seeds (sample std; none for
one seed), mean traffic up and down per client, rounds and wall time; with ``--reference <runs>``
also the rounds the mean curve takes to reach 90 % (``--fraction``) of the reference's final
accuracy. A rule without a global model (FedSA-LoRA) has no test accuracy: its figures are the
clients' own models on their validation slices (``client_val_accuracy_mean``), marked †. Runs that
were audited (``audit.json``, see :mod:`fedpeft.audit`) add the membership AUC, its calibrated
variant and the mean canary exposure, mean ± std over the audited seeds. Printed as
Markdown and written as ``report.md``, ``report.csv`` and overlaid ``accuracy_vs_round.png`` /
``accuracy_vs_mb.png``. The results tables of docs/results.md are made with this module.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from fedpeft.reporting import plots
from fedpeft.reporting.metrics import read_metrics

# Settings that are not part of what a group is: the seed is what a group averages over.
NOT_A_SETTING = ("seed", "resume", "overwrite", "verbose", "hydra.", "deploy.run_dir", "extra.")
DEFAULT = "(default)"


class ReportError(ValueError):
    """The given paths hold no runs, or a run's files cannot be read."""


PERSONAL_ACCURACY = "client_val_accuracy_mean"  # what a run without a global model is judged by


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    seed: Any
    settings: dict[str, str]  # overrides (or flattened config) of this run, seed included
    num_clients: int | None = None
    audit: dict[str, Any] | None = None  # the run's audit.json, when it was audited

    @property
    def accuracy_key(self) -> str:
        """``test_accuracy``, or the clients' own models (``client_val_accuracy_mean``) for a run that never
        had a global one."""
        if any(r.get("test_accuracy") is not None for r in self.rows) or not any(
            r.get(PERSONAL_ACCURACY) is not None for r in self.rows
        ):
            return "test_accuracy"
        return PERSONAL_ACCURACY

    @property
    def accuracies(self) -> list[float | None]:
        """The accuracy of each round (None where the round was not evaluated)."""
        return [r.get(self.accuracy_key) for r in self.rows]

    @property
    def final_accuracy(self) -> float | None:
        evaluated = [a for a in self.accuracies if a is not None]
        return evaluated[-1] if evaluated else None

    @property
    def best_accuracy(self) -> float | None:
        evaluated = [a for a in self.accuracies if a is not None]
        return max(evaluated) if evaluated else None

    @property
    def final_loss(self) -> float | None:
        evaluated = [r["test_loss"] for r in self.rows if r.get("test_loss") is not None]
        return evaluated[-1] if evaluated else None


@dataclass
class Group:
    columns: tuple[str, ...]  # the differing settings
    key: tuple[str, ...]  # their values in this group
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{c}={v}" for c, v in zip(self.columns, self.key)) if self.key else "all runs"


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (each with a ``metrics.jsonl``): the paths themselves, or the runs below them."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"no such file or directory: {str(path)!r}")
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("metrics.jsonl"))
        if not below:
            raise ReportError(f"{str(path)!r} is neither a run directory nor holds any (no metrics.jsonl below it)")
        found.extend(below)
    return list(dict.fromkeys(p.resolve() for p in found))


def flatten(tree: Mapping[str, Any], prefix: str = "", *, encode: bool = True) -> dict[str, Any]:
    """``dotted.key -> value`` of a nested mapping; ``encode`` writes each non-string value as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + ".", encode=encode))
        else:
            flat[name] = json.dumps(value) if encode and not isinstance(value, str) else value
    return flat


def read_overrides(run_dir: Path) -> dict[str, str] | None:
    """``key -> value`` of the run's Hydra overrides (``+exp=a`` gives ``exp -> a``); None without them."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    settings = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ReportError(f"{path}: cannot read the override {item!r}")
        settings[key.lstrip("+~")] = value
    return settings


def read_config(run_dir: Path) -> dict[str, str]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(
            f"run {str(run_dir)!r} has neither .hydra/overrides.yaml nor config.yaml: its settings are unknown"
        )
    return flatten(yaml.safe_load(path.read_text()) or {})


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    overrides = {d: read_overrides(d) for d in run_dirs}
    use_overrides = all(o is not None for o in overrides.values())
    runs = []
    for d in run_dirs:
        config = read_config(d) if (d / "config.yaml").is_file() else {}
        settings = overrides[d] if use_overrides else read_config(d)
        assert settings is not None  # use_overrides: every run's overrides are known
        seed = settings.get("seed")
        if seed is None:  # an override list without seed=: the run's seed is in its config
            seed = config.get("seed")
        try:
            rows = read_metrics(d)
        except ValueError as err:
            raise ReportError(f"{d / 'metrics.jsonl'}: not JSON lines ({err})") from None
        clients = config.get("num_clients")
        audit = None
        if (d / "audit.json").is_file():
            try:
                audit = json.loads((d / "audit.json").read_text())
            except ValueError as err:
                raise ReportError(f"{d / 'audit.json'}: not JSON ({err})") from None
        runs.append(
            Run(
                path=d,
                rows=rows,
                seed=seed,
                settings=settings,
                num_clients=int(clients) if clients is not None else None,
                audit=audit,
            )
        )
    return runs


AUDIT_FIGURES = (  # (summary name, column, where in audit.json)
    ("membership_auc", "membership AUC", ("membership", "overall", "auc")),
    ("calibrated_auc", "calibrated AUC", ("membership", "overall", "calibrated_auc")),
    ("exposure", "canary exposure (bits)", ("canaries", "mean_exposure")),
)


def audit_figure(audit: Mapping[str, Any] | None, path: Sequence[str]) -> float | None:
    value: Any = audit
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value)


def differing_settings(runs: Sequence[Run]) -> list[str]:
    """The setting names whose value is not the same in every run (a missing override counts as a value)."""
    names = sorted({k for r in runs for k in r.settings if not k.startswith(NOT_A_SETTING)})
    return [k for k in names if len({r.settings.get(k, DEFAULT) for r in runs}) > 1]


def group_runs(runs: Sequence[Run]) -> tuple[list[str], list[Group]]:
    """(the differing setting names, the groups in first-seen order)."""
    columns = differing_settings(runs)
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = tuple(run.settings.get(c, DEFAULT) for c in columns)
        groups.setdefault(key, Group(columns=tuple(columns), key=key)).runs.append(run)
    return columns, list(groups.values())


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the values that exist; std is None for fewer than two."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None, None
    return statistics.mean(present), statistics.stdev(present) if len(present) > 1 else None


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(rows[-1].get(key) or 0) if rows else 0.0


def mean_curve(runs: Sequence[Run]) -> list[float | None]:
    """The accuracy of each round averaged over the runs that evaluated it."""
    length = max((len(r.rows) for r in runs), default=0)
    curve = []
    for i in range(length):
        present = [a for r in runs if i < len(r.rows) and (a := r.accuracies[i]) is not None]
        curve.append(statistics.mean(present) if present else None)
    return curve


def rounds_to(runs: Sequence[Run], target: float) -> int | None:
    """The first round whose mean accuracy over the runs reaches ``target`` (None: never)."""
    return next((i + 1 for i, a in enumerate(mean_curve(runs)) if a is not None and a >= target), None)


def summarise(group: Group, *, target: float | None = None) -> dict[str, Any]:
    """The CSV row of a group: accuracies in [0, 1], traffic in MB, time in seconds.

    ``target``: an accuracy; the row then has ``rounds_to_target``, the first round whose mean
    accuracy over the group's runs reaches it (None: never)."""
    runs = group.runs
    out: dict[str, Any] = {
        "runs": len(runs),
        "seeds": " ".join(str(r.seed) for r in runs),
        "accuracy": runs[0].accuracy_key,
    }
    for name, values in (
        ("final_accuracy", [r.final_accuracy for r in runs]),
        ("best_accuracy", [r.best_accuracy for r in runs]),
        ("final_test_loss", [r.final_loss for r in runs]),
    ):
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
    out["rounds"] = statistics.mean(len(r.rows) for r in runs)
    out["mb_up"] = statistics.mean(_last(r.rows, "cumulative_bytes_up") / 1e6 for r in runs)
    out["mb_down"] = statistics.mean(_last(r.rows, "cumulative_bytes_down") / 1e6 for r in runs)
    clients = [r.num_clients for r in runs]
    if all(clients):
        out["mb_up_per_client"] = statistics.mean(
            _last(r.rows, "cumulative_bytes_up") / 1e6 / cast(int, r.num_clients) for r in runs
        )
        out["mb_down_per_client"] = statistics.mean(
            _last(r.rows, "cumulative_bytes_down") / 1e6 / cast(int, r.num_clients) for r in runs
        )
    out["seconds"] = statistics.mean(sum(row.get("wall_seconds") or 0 for row in r.rows) for r in runs)
    if target is not None:
        out["rounds_to_target"] = rounds_to(runs, target)
    for name, _, where in AUDIT_FIGURES:
        values = [audit_figure(r.audit, where) for r in runs]
        if any(v is not None for v in values):
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
    return out


def pm(mean: float | None, std: float | None, *, scale: float = 1.0, digits: int = 1) -> str:
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def markdown(
    columns: Sequence[str],
    groups: Sequence[Group],
    summaries: Sequence[Mapping[str, Any]],
    *,
    target_label: str | None = None,
) -> str:
    """The table: one row per group; MB per client where every run's client count is known, else
    over all clients; ``target_label`` names the rounds-to-target column (when the summaries have it)."""
    per_client = all("mb_up_per_client" in s for s in summaries)
    mb = ("MB up / client", "MB down / client") if per_client else ("MB up", "MB down")
    head = [*(columns or ["runs"]), "seeds", "final acc (%)", "best acc (%)", "test loss", *mb, "rounds", "time (s)"]
    if target_label:
        head.append(target_label)
    audited = [(name, column) for name, column, _ in AUDIT_FIGURES if any(f"{name}_mean" in s for s in summaries)]
    head += [column for _, column in audited]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, s in zip(groups, summaries):
        mark = " †" if s["accuracy"] == PERSONAL_ACCURACY else ""
        cells = [*(group.key or ("all",)), str(s["runs"])]
        cells += [
            pm(s["final_accuracy_mean"], s["final_accuracy_std"], scale=100) + mark,
            pm(s["best_accuracy_mean"], s["best_accuracy_std"], scale=100) + mark,
            pm(s["final_test_loss_mean"], s["final_test_loss_std"], digits=3),
            f"{s['mb_up_per_client' if per_client else 'mb_up']:.2f}",
            f"{s['mb_down_per_client' if per_client else 'mb_down']:.2f}",
            f"{s['rounds']:g}",
            f"{s['seconds']:.0f}",
        ]
        if target_label:
            cells.append("—" if s.get("rounds_to_target") is None else str(s["rounds_to_target"]))
        cells += [
            pm(s.get(f"{name}_mean"), s.get(f"{name}_std"), digits=2 if name == "exposure" else 3)
            for name, _ in audited
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(s["accuracy"] == PERSONAL_ACCURACY for s in summaries):
        lines += [
            "",
            "† no global model: the clients' own models on their validation slices (`client_val_accuracy_mean`), "
            "weighted by examples.",
        ]
    return "\n".join(lines) + "\n"


def reference_target(paths: Sequence[str | Path], fraction: float) -> tuple[float, str]:
    """(``fraction`` × the mean final accuracy of the reference runs below ``paths``, the column's name)."""
    runs = load_runs(find_runs(paths))
    finals = [r.final_accuracy for r in runs if r.final_accuracy is not None]
    if not finals:
        raise ReportError(f"the reference runs {[str(p) for p in paths]} have no evaluated round")
    return fraction * statistics.mean(
        finals
    ), f"rounds to {100 * fraction:g} % of reference ({100 * statistics.mean(finals):.1f} %)"


def report(
    paths: Sequence[str | Path], out_dir: Path, *, reference: Sequence[str | Path] = (), fraction: float = 0.9
) -> str:
    """Write ``report.md``, ``report.csv`` and the overlaid plots to ``out_dir``; returns the Markdown."""
    runs = load_runs(find_runs(paths))
    columns, groups = group_runs(runs)
    target, target_label = reference_target(reference, fraction) if reference else (None, None)
    summaries = [summarise(g, target=target) for g in groups]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(columns, groups, summaries, target_label=target_label)
    sources = "\n".join(f"- {g.label}: " + ", ".join(str(r.path) for r in g.runs) for g in groups)
    (out_dir / "report.md").write_text(
        f"{len(runs)} runs, grouped by {', '.join(columns) or 'nothing (all runs alike)'}; mean ± std over "
        f"seeds.\n\n{text}\nRuns:\n{sources}\n"
    )
    with (out_dir / "report.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=[*columns, *dict.fromkeys(k for s in summaries for k in s)]
        )  # audited groups add columns
        writer.writeheader()
        for group, s in zip(groups, summaries):
            writer.writerow({**dict(zip(columns, group.key)), **{k: "" if v is None else v for k, v in s.items()}})
    plots.overlay_plots({g.label: [plot_rows(r) for r in g.runs] for g in groups}, out_dir)
    return text


def plot_rows(run: Run) -> list[dict[str, Any]]:
    """The run's rows with its accuracy as ``test_accuracy``.

    The accuracy is the test accuracy, or the clients' own for a run without a global model.
    """
    if run.accuracy_key == "test_accuracy":
        return run.rows
    return [{**row, "test_accuracy": row.get(run.accuracy_key)} for row in run.rows]


def default_out(paths: Sequence[str]) -> Path:
    """One directory that is not itself a run (a multirun): its ``report/``; otherwise ``./report``."""
    if len(paths) == 1 and not (Path(paths[0]) / "metrics.jsonl").exists():
        return Path(paths[0]) / "report"
    return Path("report")


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", help="run directories, or directories holding runs (a Hydra multirun folder)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where report.md, report.csv and the plots go (default: <multirun dir>/report or ./report)",
    )
    parser.add_argument(
        "--reference",
        nargs="+",
        default=(),
        help="runs whose mean final accuracy is the target of a 'rounds to target' column "
        "(e.g. a mode=centralized run)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.9,
        help="the target is this fraction of the reference's accuracy (default 0.9)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    out = args.out or default_out(args.paths)
    try:
        text = report(args.paths, out, reference=args.reference, fraction=args.fraction)
    except ReportError as err:
        print(f"fedpeft.report: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"\nwritten to {out}/: report.md, report.csv, {plots.ACCURACY_VS_ROUND}, {plots.ACCURACY_VS_MB}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
