"""Compare the four rules on the embedded benchmark: homogeneous and heterogeneous ranks, 3 seeds.

Runs FedIT, FFA-LoRA, FLoRA and LoRA-FAIR (Dirichlet α = 0.5 over 10 clients, 4 per round) with
rank 8 everywhere and with ranks [16, 8, 4, 4, 2, 2, 1, 1, 1, 1], plus the centralised LoRA
reference, for each seed; then writes

* ``<out>/results.md`` — final test accuracy mean ± std, bytes up and down, wall time;
* ``<out>/accuracy_vs_round.png`` and ``<out>/accuracy_vs_bytes.png``;
* ``<out>/runs/<setting>-<rule>-seed<k>/`` — every run directory (metrics.jsonl, config, ...).

A run whose directory already holds all its rounds is not repeated, so the script can be
stopped and started again.

    python experiments/compare_rules.py [--seeds 0 1 2] [--rounds 6] [--out experiments/results/compare_rules]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fedpeft.config.schema import to_config
from fedpeft.reporting.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

RULES = ["fedavg", "ffa_lora", "flora", "lora_fair"]
HETERO = [16, 8, 4, 4, 2, 2, 1, 1, 1, 1]
SETTINGS = {"homogeneous": None, "heterogeneous": HETERO}


def run_config(*, rule: str | None, ranks, seed: int, rounds: int, max_length: int, steps: int) -> dict:
    cfg = {
        "seed": seed,
        "num_rounds": rounds,
        "num_clients": 10,
        "clients_per_round": 4,
        "model": {"max_length": max_length},
        "client": {"local_steps": steps},
        "data": {"partitioner": "dirichlet", "dirichlet_alpha": 0.5},
    }
    if rule is None:
        cfg["mode"] = "centralized"
    else:
        cfg["strategy"] = {"name": rule, "ranks": ranks}
    return cfg


def run_one(run_dir: Path, cfg_dict: dict) -> list[dict]:
    from fedpeft.models import adapters as models
    from fedpeft.run import execute

    cfg = to_config({**cfg_dict, "overwrite": True})  # an unfinished earlier attempt is redone
    if (run_dir / "metrics.jsonl").exists():
        rows = read_metrics(run_dir)
        if len(rows) == cfg.num_rounds and (run_dir / "wall.json").exists():
            return rows
    started = time.perf_counter()
    rows = execute(cfg, run_dir)
    (run_dir / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    models.clear_cache()
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summarise(out: Path, results: dict, seeds: list[int]) -> str:
    lines = [
        f"Embedded benchmark (MiniLM + BBC News, 10 clients, 4 per round, Dirichlet α = 0.5, seeds {seeds}).",
        "Accuracy: final test accuracy (%), mean ± std over seeds. Bytes: mean per run, all clients, whole run.",
        "",
        "| setting | rule | accuracy | MB up | MB down | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for (setting, rule), runs in results.items():
        accs = [r["rows"][-1]["test_accuracy"] for r in runs]
        up = statistics.mean(r["rows"][-1]["cumulative_bytes_up"] for r in runs) / 1e6
        down = statistics.mean(r["rows"][-1]["cumulative_bytes_down"] for r in runs) / 1e6
        wall = statistics.mean(r["wall"] for r in runs)
        lines.append(f"| {setting} | {rule} | {mean_std(accs)} | {up:.2f} | {down:.2f} | {wall:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, name, label in (
        ("round", "accuracy_vs_round.png", "round"),
        ("bytes", "accuracy_vs_bytes.png", "cumulative MB (up + down)"),
    ):
        fig, axes = plt.subplots(1, len(SETTINGS), figsize=(6 * len(SETTINGS), 4), sharey=True)
        for ax, setting in zip(axes, SETTINGS):
            for (s, rule), runs in results.items():
                if s not in (setting, "reference") or (x_key == "bytes" and s == "reference"):
                    continue
                rows = runs[0]["rows"]
                rounds = [r["round"] for r in rows]
                accs = [statistics.mean(run["rows"][i]["test_accuracy"] for run in runs) for i in range(len(rows))]
                xs = (
                    rounds
                    if x_key == "round"
                    else [(r["cumulative_bytes_up"] + r["cumulative_bytes_down"]) / 1e6 for r in rows]
                )
                ax.plot(
                    xs, [100 * a for a in accs], marker="o", label=rule, linestyle="--" if s == "reference" else "-"
                )
            ax.set_title(setting)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (%)")
        axes[-1].legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "compare_rules"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {}
    plan = [(setting, rule) for setting in SETTINGS for rule in RULES] + [("reference", "centralized")]
    for seed in args.seeds:
        for setting, rule in plan:
            ranks = SETTINGS.get(setting)
            cfg = run_config(
                rule=None if rule == "centralized" else rule,
                ranks=ranks,
                seed=seed,
                rounds=args.rounds,
                max_length=args.max_length,
                steps=args.local_steps,
            )
            run_dir = out / "runs" / f"{setting}-{rule}-seed{seed}"
            rows = run_one(run_dir, cfg)
            wall = json.loads((run_dir / "wall.json").read_text())["seconds"]
            results.setdefault((setting, rule), []).append({"rows": rows, "wall": wall})
            print(
                f"[compare_rules] {setting:13s} {rule:11s} seed {seed}: accuracy {100 * rows[-1]['test_accuracy']:.1f}% in {wall:.0f} s",
                flush=True,
            )
            summarise(out, results, args.seeds)
    print(summarise(out, results, args.seeds))
    plot(out, results)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
