"""The ten-rule table: every rule at its own best learning rate, homogeneous and heterogeneous ranks, DP.

Settings (issue 12): MiniLM + BBC News, 10 clients, all of them every round
(``--clients-per-round``), Dirichlet(0.5); rank 8 everywhere ("homogeneous") and ranks [16, 8, 4, 4, 2, 2, 1, 1, 1, 1] ("heterogeneous", for the rules that
take them); FedIT, FFA-LoRA, FedSVD and RoLoRA also under DP-SGD at ε = 3; the centralised
reference. Steps:

1. learning-rate sweep (seed 0, homogeneous, ``--lrs``): each rule's rate is the one whose final
   global model is most accurate on the clients' validation slices pooled (validation loss breaks
   ties; FedSA-LoRA: its clients' personal models); never the test split;
2. every (setting, rule) at that rate for ``--seeds``;
3. ``<out>/results.md`` — final and best test accuracy (mean ± std over seeds), MB up and down
   per client over the run, rounds to reach 90 % of the centralised reference; ``<out>/
   accuracy_vs_round.png`` and ``<out>/accuracy_vs_bytes.png``; the table is also written into
   docs/results.md between the ``compare_all_rules`` markers, and the plots into docs/assets/.

The table and curves are :mod:`fedpeft.report`'s (``python -m fedpeft.report <out>/runs
--reference <out>/runs/reference-*`` prints the same figures, grouped by config). The bounds: the
centralised reference (``mode=centralized``, pooled data, the steps of a round) and the local-only
bound (``mode=local``, each client alone). FedSA-LoRA has no global model (each client keeps its
B): its accuracy is the example-weighted mean of every node's own model on its validation slice
(``client_val_accuracy_mean``), marked ``†``.
Every run directory is kept under ``<out>/runs/``; a finished run is read, not repeated, so the
script can be stopped and restarted, and its finished runs committed as it goes.

    PYTHONPATH=$PWD python experiments/compare_all_rules.py                 # the full sweep (hours)
    PYTHONPATH=$PWD python experiments/compare_all_rules.py --quick         # a minutes-long smoke version
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpeft import report
from fedpeft.config.schema import to_config
from fedpeft.reporting.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

RULES = [
    "fedavg",
    "ffa_lora",
    "flora",
    "lora_fair",
    "fedex_lora",
    "flexlora",
    "fedsa_lora",
    "rolora",
    "fedsvd",
    "hetlora",
]
EQUAL_RANKS_ONLY = {"fedex_lora"}  # refuses heterogeneous ranks at start
DP_RULES = ["fedavg", "ffa_lora", "fedsvd", "rolora"]
HETERO = [16, 8, 4, 4, 2, 2, 1, 1, 1, 1]
DOCS_START, DOCS_END = "<!-- compare_all_rules:start -->", "<!-- compare_all_rules:end -->"
DOCS_PAGE, DOCS_ASSETS = REPO / "docs" / "results.md", REPO / "docs" / "assets" / "compare_all_rules"


def lr_name(setting: str, rule: str) -> str:
    """A learning rate's key in ``learning_rates.json``: DP-SGD's runs have a sweep of their own."""
    return f"dp/{rule}" if setting == "dp" else rule


def pick_rate(
    score: Callable[[float], tuple[float, float]], grid: Sequence[float], *, widen: int
) -> tuple[float, dict[float, tuple[float, float]]]:
    """The rate of ``grid`` with the best ``score`` (higher is better), and every rate's score.

    While the best is the largest rate tried the grid goes on by doubling, and while it is the
    smallest by halving, at most ``widen`` times in all: a pick at an edge of the grid says only
    that the best rate may lie beyond it.
    """
    scores = {lr: score(lr) for lr in grid}
    for _ in range(widen):
        best = max(scores, key=lambda lr: scores[lr])
        if best not in (max(scores), min(scores)):
            break
        beyond = 2 * best if best == max(scores) else best / 2
        scores[beyond] = score(beyond)
    return max(scores, key=lambda lr: scores[lr]), scores


def rounds_of(setting: str, args: argparse.Namespace) -> int:
    """The rounds of a setting: ``--dp-rounds`` for DP (its noise is calibrated to ε over them),
    ``--rounds`` otherwise."""
    return args.dp_rounds if setting == "dp" and args.dp_rounds else args.rounds


def run_config(
    *, rule: str | None, setting: str, seed: int, lr: float, args: argparse.Namespace, rounds: int | None = None
) -> dict:
    """One run's overrides; ``rounds`` (the learning-rate sweep's) replaces the setting's."""
    cfg = {
        "seed": seed,
        "num_rounds": rounds or rounds_of(setting, args),
        "eval_every": args.eval_every,
        "num_clients": 10,
        "clients_per_round": args.clients_per_round,
        "save_adapter": False,
        "model": {"max_length": args.max_length, "autocast": None if args.autocast == "none" else args.autocast},
        "client": {"local_steps": args.local_steps, "lr": lr, "lr_decay": args.lr_decay},
        "data": {
            "partitioner": "dirichlet",
            "dirichlet_alpha": 0.5,
            **({"max_samples": args.max_samples} if args.max_samples else {}),
        },
    }
    if rule is None:  # a bound: "reference" (pooled data) or "local" (each client alone)
        cfg["mode"] = "local" if setting == "local" else "centralized"
        if setting == "local":
            cfg["eval_every"] = max(
                args.eval_every, args.rounds // 4
            )  # ten models on the test split each round would cost more than the run
        return cfg
    cfg["engine"] = {"name": args.engine}  # the bounds run in the server process whatever the engine
    cfg["strategy"] = {"name": rule, "ranks": HETERO if setting == "heterogeneous" else None}
    if setting == "dp":
        cfg["client"]["dp"] = {"enabled": True, "target_epsilon": args.epsilon, "noise_multiplier": None}
    return cfg


def run_one(run_dir: Path, cfg_dict: dict, *, redo: bool = False) -> tuple[list[dict], float] | None:
    """The run's metrics rows and wall seconds; a finished run directory is read, not rerun.

    A run that finished other rounds than asked is lengthened in place (``resume=`` with the new
    ``num_rounds``: it ends exactly as a run planned that long) where that is allowed; one that
    cannot be (DP noise calibrated for its rounds, a bound) is kept and None returned, or redone
    with ``redo``. An unfinished attempt is redone. ``wall.json`` keeps each sitting's start and
    end, so the sweep's wall-clock time counts every part.
    """
    from fedpeft.models import adapters as models
    from fedpeft.run import execute

    cfg = to_config({**cfg_dict, "overwrite": True})  # read below if it finished; an unfinished attempt is redone
    wall_file = run_dir / "wall.json"
    sittings: list[list[float]] = []
    if wall_file.exists() and (run_dir / "metrics.jsonl").exists():
        if changed := differs(run_dir, cfg):
            raise SystemExit(
                f"[compare_all_rules] {run_dir} was run with other settings than asked ({', '.join(changed)}): move it away, or pass --out elsewhere"
            )
        rows = read_metrics(run_dir)
        if len(rows) == cfg.num_rounds:
            return rows, json.loads(wall_file.read_text())["seconds"]
        if lengthens(run_dir, cfg_dict):
            cfg, sittings = to_config({**cfg_dict, "resume": str(run_dir)}), wall_sittings(wall_file)
        elif not redo:
            print(
                f"[compare_all_rules] {run_dir.name}: kept as it is ({len(rows)} rounds, not {cfg.num_rounds}); --redo replaces it",
                flush=True,
            )
            return None
    started, begun = time.perf_counter(), time.time()
    rows = execute(cfg, run_dir)
    sittings.append([begun, begun + time.perf_counter() - started])
    wall = sum(end - start for start, end in sittings)
    wall_file.write_text(json.dumps({"seconds": wall, "sittings": sittings}))
    models.clear_cache()
    return rows, wall


def differs(run_dir: Path, cfg) -> list[str]:
    """The settings (dotted keys, with both values) in which the run in ``run_dir`` differs from
    ``cfg``, its length and run-directory handling aside: a finished run is reused only as the run asked."""
    from omegaconf import OmegaConf

    from fedpeft.config.schema import to_container

    saved = report.flatten(to_container(to_config(OmegaConf.load(run_dir / "config.yaml"))), encode=False)
    asked = report.flatten(to_container(cfg), encode=False)
    return [
        f"{k}: {saved.get(k)!r} there, {asked.get(k)!r} asked"
        for k in sorted(saved.keys() | asked.keys())
        if k not in ("num_rounds", "resume", "overwrite") and saved.get(k) != asked.get(k)
    ]


def finished(run_dir: Path, rounds: int) -> bool:
    return (run_dir / "wall.json").exists() and len(read_metrics(run_dir)) == rounds


def lengthens(run_dir: Path, cfg_dict: dict) -> bool:
    """Whether the finished run in ``run_dir`` can go on to ``cfg_dict``'s rounds (same config
    otherwise, no DP target)."""
    from fedpeft.run import run_config
    from fedpeft.server.checkpoint import load_checkpoint
    from fedpeft.server.errors import RunError

    cfg = to_config({**cfg_dict, "resume": str(run_dir)})
    if cfg.mode != "simulation" or not (run_dir / "checkpoint.pt").exists():
        return False
    try:
        return load_checkpoint(run_dir, run_config(cfg))["round"] < cfg.num_rounds
    except RunError as err:
        print(f"[compare_all_rules] {run_dir.name}: cannot be lengthened ({err})", flush=True)
        return False


def wall_sittings(wall_file: Path) -> list[list[float]]:
    """[start, end] of each sitting of a run (a run written before sittings were kept: one, ending
    at the file's time)."""
    wall = json.loads(wall_file.read_text())
    if "sittings" in wall:
        return wall["sittings"]
    end = wall_file.stat().st_mtime
    return [[end - wall["seconds"], end]]


def validation_score(run_dir: Path) -> tuple[float, float]:
    """(accuracy, −loss) of the run's final global model on every client's validation slice pooled.

    Read from the run's last checkpoint (``checkpoint.pt``), so a finished run is scored without
    rerunning it. A rule without a global model (FedSA-LoRA) is scored by its own federated
    evaluation of the clients' personal models (``client_val_accuracy_mean``). Never the test split.
    """
    import torch
    from omegaconf import OmegaConf

    from fedpeft.data.encoding import collator_for, encode_config, make_loader
    from fedpeft.data.partition import prepare
    from fedpeft.models import adapters as models
    from fedpeft.server.evaluation import ServerEvaluator, initial_adapter
    from fedpeft.strategies import get_strategy
    from fedpeft.training.local import evaluate

    cfg = to_config(OmegaConf.load(run_dir / "config.yaml"))
    rule = get_strategy(cfg.strategy.name)
    if not rule.has_global_model:
        return read_metrics(run_dir)[-1]["client_val_accuracy_mean"], 0.0
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=True)
    evaluator = ServerEvaluator(cfg, data, lineage=state["lineage"])
    strategy = rule.from_config(cfg, initial_adapter(evaluator.cm, rank=max(models.client_ranks(cfg)), seed=cfg.seed))
    strategy.load_state_dict(state["strategy"])
    model = evaluator.load(strategy.global_model())
    tokenizer = models.load_tokenizer(cfg.model)
    val = [e for k in range(cfg.num_clients) for e in encode_config(cfg, data.client_split(k)[1], tokenizer)]
    loader = make_loader(
        val, pad_token_id=tokenizer.pad_token_id, batch_size=64, shuffle=False, collate_fn=collator_for(cfg, tokenizer)
    )
    result = evaluate(model, loader, device=evaluator.cm.device)
    return result.accuracy, -result.loss


def scored(run_dir: Path, rounds: int) -> bool:
    kept = run_dir / "sweep_score.json"
    return kept.exists() and json.loads(kept.read_text())["rounds"] == rounds


def sweep_score(run_dir: Path, rounds: int) -> tuple[float, float]:
    """:func:`validation_score` of the sweep run after its ``rounds`` rounds, kept in ``sweep_score.json``:
    the picked run is lengthened afterwards, and a rerun of the script must pick as the first did."""
    kept = run_dir / "sweep_score.json"
    if scored(run_dir, rounds):
        return tuple(json.loads(kept.read_text())["score"])
    if len(read_metrics(run_dir)) != rounds:
        raise SystemExit(
            f"{run_dir.name} ran {len(read_metrics(run_dir))} rounds and has no sweep_score.json for {rounds}: rerun it with --redo or into a new --out"
        )
    score = validation_score(run_dir)
    kept.write_text(json.dumps({"rounds": rounds, "score": list(score)}))
    return score


def sweep_span(run_dirs: list[Path]) -> float:
    """Wall-clock seconds during which at least one of the runs was going (runs overlap; a sweep
    may pause between parts)."""
    spans = sorted(span for d in run_dirs for span in wall_sittings(d / "wall.json"))
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def end_change(runs: list) -> float | None:
    """Mean accuracy (over the runs and the evaluated rounds) of the last quarter of the rounds minus
    that of the quarter before, in points; None when either quarter has no evaluated round."""
    points = [(row["round"], a) for row, a in zip(runs[0].rows, report.mean_curve(runs)) if a is not None]
    last_round = points[-1][0] if points else 0
    quarter = max(1, last_round // 4)
    last = [a for r, a in points if r > last_round - quarter]
    before = [a for r, a in points if last_round - 2 * quarter < r <= last_round - quarter]
    return 100 * (sum(last) / len(last) - sum(before) / len(before)) if last and before else None


def flatness(results: dict[tuple[str, str], list[Path]]) -> str:
    """How flat each group's curve is at the end (:func:`end_change` of its mean curve over seeds), one
    part per setting; then, per seed, the mean of that change over every homogeneous and heterogeneous group."""
    by_setting: dict[str, list[str]] = {}
    by_seed: dict[object, list[float]] = {}
    for (setting, rule), dirs in results.items():
        runs = report.load_runs(dirs)
        if (change := end_change(runs)) is not None:
            by_setting.setdefault(setting, []).append(f"{rule} {change:+.1f}")
        if setting in ("homogeneous", "heterogeneous"):
            for run in runs:
                if (own := end_change([run])) is not None:
                    by_seed.setdefault(run.seed, []).append(own)
    text = "; ".join(f"{setting}: {', '.join(parts)}" for setting, parts in by_setting.items())
    if by_seed:
        text += ". By seed, over the homogeneous and heterogeneous groups: " + ", ".join(
            f"seed {seed} {sum(v) / len(v):+.1f} (from {min(v):+.1f} to {max(v):+.1f})"
            for seed, v in sorted(by_seed.items(), key=lambda kv: str(kv[0]))
        )
    return text


def table(
    results: dict[tuple[str, str], list[Path]], lrs: dict[str, float], args: argparse.Namespace, every_run: list[Path]
) -> str:
    """The results table, made by :mod:`fedpeft.report` from the run directories (one group per setting and rule)."""
    groups = []
    for (setting, rule), dirs in results.items():
        bound = setting in ("reference", "local")
        lr = f"{lrs[lr_name(setting, rule)]:g}"
        key = (
            ("bound", {"reference": "centralised", "local": "local-only ‡"}[setting], lr)
            if bound
            else (setting, rule, lr)
        )
        groups.append(report.Group(columns=("setting", "rule", "lr"), key=key, runs=report.load_runs(dirs)))
    groups.sort(key=lambda g: g.key[0] == "bound")  # the bounds last
    target, target_label = report.reference_target(results[("reference", "centralized")], 0.9)
    summaries = [report.summarise(g, target=target) for g in groups]
    sweep_rounds = args.sweep_rounds or args.rounds
    summed = sum(json.loads((d / "wall.json").read_text())["seconds"] for d in every_run)
    head = (
        f"MiniLM + BBC News, 10 clients, {args.clients_per_round} per round, Dirichlet α = 0.5; {args.rounds} rounds "
        f"{f'(DP: {args.dp_rounds}) ' if args.dp_rounds and args.dp_rounds != args.rounds else ''}of {args.local_steps} local steps"
        f"{f' at lr · {args.lr_decay:g}^(t-1) in round t (the lr column is the base rate)' if args.lr_decay != 1.0 else ''}, "
        f"max length {args.max_length}{f', {args.max_samples} examples' if args.max_samples else ''}"
        f"{f'; the forward in {args.autocast} (model.autocast; DP-SGD clips and noises float32 per-sample gradients)' if args.autocast != 'none' else ''}; test accuracy every {args.eval_every} rounds; "
        f"engine {args.engine}; seeds {args.seeds} (the seeds column counts "
        f"each group's finished runs); "
        f"DP-SGD at ε = {args.epsilon} (δ = 1e-5). Each rule's learning rate is the best of {args.lrs}"
        f"{' (a pick at the top or bottom tried again at twice or half the rate, up to ' + str(args.widen) + ' times)' if args.widen else ''} by its final global model's "
        f"accuracy on the clients' pooled validation slices after {sweep_rounds} rounds (seed 0, homogeneous ranks; loss breaks ties; FedSA-LoRA: the clients' own models); "
        f"the DP rows' by the same score of DP runs of their own, calibrated to ε over those {sweep_rounds} rounds; "
        f"the centralised reference's by its final training loss (it has no clients to validate on)"
        f"{f'; the local-only bound ran at {args.local_lrs} only' if args.local_lrs else ''}. "
        f"All {len(every_run)} runs behind the table (the learning-rate sweep's included): {sweep_span(every_run) / 60:.0f} min wall-clock on 2 CPU cores "
        f"(time with at least one run going; {summed / 60:.0f} min of run time summed)."
    )
    foot = (
        "‡ Local-only (`mode=local`): every client trains its own adapter on its own data every round and never communicates; "
        "accuracy of the clients' models on the test split, weighted by their training examples.\n\n"
        "How flat the curves are at the end — mean test accuracy over the last quarter of a run's rounds minus that over the quarter "
        f"before, in points (over seeds and the evaluated rounds): {flatness(results)}.\n"
    )
    return f"{head}\n\n{report.markdown(['setting', 'rule', 'lr'], groups, summaries, target_label=target_label)}{foot}"


def plot(out: Path, results: dict[tuple[str, str], list[Path]]) -> None:
    """accuracy_vs_round.png and accuracy_vs_bytes.png: one panel per setting, one line per rule
    (mean over seeds); the bounds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds = ("reference", "local")
    settings = sorted({s for s, _ in results if s not in bounds})
    names = list(dict.fromkeys(rule for _, rule in results))  # one colour per rule in every panel
    colors = {rule: plt.get_cmap("tab20")(i % 20) for i, rule in enumerate(names)}
    for x_key, name, label in (
        ("round", "accuracy_vs_round.png", "round"),
        ("bytes", "accuracy_vs_bytes.png", "cumulative MB per client (up + down)"),
    ):
        fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), sharey=True, squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for (s, rule), dirs in results.items():
                if s not in (setting, *bounds) or (x_key == "bytes" and s in bounds):
                    continue
                runs = report.load_runs(dirs)
                rows = runs[0].rows
                accs = report.mean_curve(runs)
                xs = (
                    [r["round"] for r in rows]
                    if x_key == "round"
                    else [(r["cumulative_bytes_up"] + r["cumulative_bytes_down"]) / 1e6 / 10 for r in rows]
                )
                shown = [(x, 100 * a) for x, a in zip(xs, accs) if a is not None]
                ax.plot(
                    *zip(*shown),
                    marker=".",
                    label=rule + (" †" if runs[0].accuracy_key != "test_accuracy" else ""),
                    linestyle="--" if s in bounds else "-",
                    color=colors[rule],
                )
            ax.set_title(setting)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        for ax in axes[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def write_docs(text: str, out: Path) -> None:
    """The table into docs/results.md between the markers; the plots into docs/assets/, where mkdocs finds them."""
    DOCS_ASSETS.mkdir(parents=True, exist_ok=True)
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        shutil.copyfile(out / name, DOCS_ASSETS / name)
    rel = DOCS_ASSETS.relative_to(DOCS_PAGE.parent).as_posix()
    body = DOCS_PAGE.read_text()
    block = f"{DOCS_START}\n{text}\n![accuracy vs round]({rel}/accuracy_vs_round.png)\n![accuracy vs MB]({rel}/accuracy_vs_bytes.png)\n{DOCS_END}"
    if DOCS_START in body and DOCS_END in body:
        body = body[: body.index(DOCS_START)] + block + body[body.index(DOCS_END) + len(DOCS_END) :]
    else:
        body = body.rstrip() + "\n\n## All ten rules\n\n" + block + "\n"
    DOCS_PAGE.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2, 4e-2])
    parser.add_argument(
        "--widen",
        type=int,
        default=2,
        help="a pick at the grid's top (bottom) is tried at twice (half) the rate, up to this many times",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument(
        "--clients-per-round",
        type=int,
        default=10,
        help="of the 10 clients (the centralised reference trains this × --local-steps steps a round)",
    )
    parser.add_argument(
        "--lr-decay",
        type=float,
        default=0.9,
        help="client.lr_decay of every run, the bounds' too: round t trains at lr · decay^(t-1) (1: constant)",
    )
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument(
        "--autocast",
        default="bfloat16",
        choices=["bfloat16", "none"],
        help="model.autocast of every run: the forward in bf16; weights, gradients (DP's per-sample ones too) and adapter float32",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=2,
        help="test-split evaluation every k rounds and after the last (the bounds' local-only runs: every rounds/4)",
    )
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument(
        "--local-lrs",
        type=float,
        nargs="+",
        default=None,
        help="the local-only bound's learning-rate grid (default: --lrs)",
    )
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--rules", nargs="+", default=RULES)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 2 rounds, 2 local steps, 300 examples, one lr: checks the pipeline",
    )
    parser.add_argument("--no-docs", action="store_true", help="leave docs/results.md and its plots as they are")
    parser.add_argument(
        "--runs-only",
        action="store_true",
        help="only the given rules' runs (no reference, no table): for parallel invocations over disjoint --rules",
    )
    parser.add_argument(
        "--finished-only", action="store_true", help="the table and plots from the runs that finished; run nothing"
    )
    parser.add_argument(
        "--bounds-only",
        action="store_true",
        help="only the centralised and local-only runs (for a parallel invocation)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["homogeneous", "heterogeneous", "dp"],
        help="which of the federated settings to run (the order of a sweep run in parts)",
    )
    parser.add_argument(
        "--lrs-from",
        default=None,
        help="take every rate from this learning_rates.json (a finished sweep's picks) instead of sweeping: to lengthen a sweep's runs without its sweep",
    )
    parser.add_argument(
        "--dp-rounds", type=int, default=0, help="rounds of the DP runs (0: --rounds); ε is reached over them"
    )
    parser.add_argument(
        "--redo",
        action="store_true",
        help="replace a finished run of other rounds that cannot be lengthened (DP, the bounds)",
    )
    parser.add_argument(
        "--sweep-rounds",
        type=int,
        default=8,
        help="rounds of the learning-rate sweep's runs; the picked rate's run is then lengthened to --rounds (with --lrs-from: the rounds that sweep ran, for the table's text)",
    )
    parser.add_argument(
        "--engine",
        default="batched",
        choices=["ray", "batched"],
        help="the simulation engine (engine.name); batched trains the clients of a round in one pass over one base",
    )
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "compare_all_rules"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.lrs, args.rounds, args.local_steps, args.max_samples, args.max_length = (
            [0],
            [5e-3],
            2,
            2,
            300,
            32,
        )
        args.sweep_rounds, args.dp_rounds, args.eval_every, args.widen = 1, 2, 1, 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def run(setting: str, rule: str | None, seed: int, lr: float, rounds: int | None = None) -> Path | None:
        # a DP sweep run is not the start of a longer run (its noise is calibrated to its own rounds): named apart
        label = "dp_sweep" if setting == "dp" and rounds is not None else setting
        name = f"{label}-{rule or ('local-only' if setting == 'local' else 'centralized')}-lr{lr:g}-seed{seed}"
        if rounds is not None and scored(out / "runs" / name, rounds):  # swept, and maybe lengthened since
            return out / "runs" / name
        if args.finished_only and not finished(out / "runs" / name, rounds or rounds_of(setting, args)):
            print(f"[compare_all_rules] {name}: not run yet (left out)", flush=True)
            return None
        done = run_one(
            out / "runs" / name,
            run_config(rule=rule, setting=setting, seed=seed, lr=lr, args=args, rounds=rounds),
            redo=args.redo,
        )
        if done is None:
            return None
        _, wall = done
        (done,) = report.load_runs([out / "runs" / name])
        print(
            f"[compare_all_rules] {name}: accuracy {100 * (done.final_accuracy or 0):.1f}% in {wall:.0f} s", flush=True
        )
        return out / "runs" / name

    def bounds() -> dict[tuple[str, str], list[Path]]:
        """The centralised and local-only bounds, each at its own rate from the same grid (seed 0):
        the centralised run has no clients to validate on, so its pick is the lowest final training
        loss; the local-only one's is the clients' validation accuracy, as for the rules."""
        picks = {
            "centralized": ("reference", lambda rows: -rows[-1]["train_loss"]),
            "local-only": ("local", lambda rows: rows[-1]["client_val_accuracy_mean"]),
        }

        def bound_score(setting: str, score: Callable[[list[dict]], float], lr: float) -> float:
            """A bound's score at ``lr``: ``score`` of its run's rows (seed 0)."""
            return score(read_metrics(run(setting, None, args.seeds[0], lr)))

        found = {}
        for name, (setting, score) in picks.items():
            if picked is not None:
                lrs[name] = picked[name]
                found[(setting, name)] = [
                    d for d in (run(setting, None, seed, lrs[name]) for seed in args.seeds) if d is not None
                ]
                continue
            grid = args.local_lrs if setting == "local" and args.local_lrs else args.lrs
            lrs[name], scores = pick_rate(
                functools.partial(bound_score, setting, score),
                grid,
                widen=args.widen,
            )
            print(f"[compare_all_rules] {name}: score by lr {scores}; picked {lrs[name]:g}", flush=True)
            found[(setting, name)] = [
                d for d in (run(setting, None, seed, lrs[name]) for seed in args.seeds) if d is not None
            ]
        return found

    lrs: dict[str, float] = {}
    picked = json.loads(Path(args.lrs_from).read_text()) if args.lrs_from else None
    if args.bounds_only:
        bounds()
        return
    # 1. the learning-rate sweeps: client validation accuracy of the last round, seed 0, homogeneous
    #    ranks; DP-SGD's own (noise changes which rate is best), in runs of its own calibrated to
    #    ε over --sweep-rounds
    sweeps = [("homogeneous", r) for r in args.rules] + [
        ("dp", r) for r in DP_RULES if r in args.rules and "dp" in args.settings
    ]

    def rule_score(setting: str, rule: str, lr: float) -> tuple[float, float]:
        """A rule's sweep score at ``lr``: its run over --sweep-rounds (seed 0)."""
        return sweep_score(run(setting, rule, args.seeds[0], lr, rounds=args.sweep_rounds), args.sweep_rounds)

    for setting, rule in sweeps:
        name = lr_name(setting, rule)
        if picked is not None:
            if name not in picked:
                raise SystemExit(f"[compare_all_rules] {args.lrs_from} has no learning rate for {name}")
            lrs[name] = picked[name]
            continue
        # accuracy first, loss breaks ties; a non-DP pick goes on to --rounds in step 2
        lrs[name], scores = pick_rate(
            functools.partial(rule_score, setting, rule),
            args.lrs,
            widen=args.widen,
        )
        print(
            f"[compare_all_rules] {name}: validation (accuracy, -loss) by lr {scores}; picked {lrs[name]:g}", flush=True
        )
    # 2. every setting at the chosen rate, every seed
    results: dict[tuple[str, str], list[Path]] = {}
    plan = [("homogeneous", r) for r in args.rules] + [
        ("heterogeneous", r) for r in args.rules if r not in EQUAL_RANKS_ONLY
    ]
    plan += [("dp", r) for r in DP_RULES if r in args.rules]
    plan = [(setting, rule) for setting, rule in plan if setting in args.settings]
    for seed in args.seeds:
        for setting, rule in plan:
            if (done := run(setting, rule, seed, lrs[lr_name(setting, rule)])) is not None:
                results.setdefault((setting, rule), []).append(done)
    if args.runs_only:
        return
    results.update(bounds())
    (out / "learning_rates.json").write_text(json.dumps(lrs, indent=1))
    every_run = sorted(
        d for d in (out / "runs").iterdir() if (d / "wall.json").exists()
    )  # the sweep's runs too, read or not
    text = table(results, lrs, args, every_run)
    (out / "results.md").write_text(text)
    plot(out, results)
    if not args.no_docs:
        write_docs(text, out)
    print(text)
    print(f"written to {out} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
