"""ComPEFT uplink compression and the privacy audit, on the embedded default (MiniLM + BBC News).

(ratios) bytes of one upload under each density, the codec alone;
(a) accuracy against MB uplink for FedIT (``fedavg``) and FFA-LoRA at ComPEFT densities 1, 0.2, 0.1
    and 0.05, with and without error feedback, next to dense uploads;
(b) membership-inference AUC (loss-threshold and calibrated) of the final model without DP and at
    ε = 8, 3, 1 (``conf/exp/fedavg_dp.yaml``'s setting, audited with ``audit.enabled=true``);
    and canary exposure (The Secret Sharer) on the tiny LLM of ``conf/exp/llm_tiny.yaml``: random
    6-digit secrets planted ``--canary-repeats`` times in client 0's data, each ranked among 1,000
    candidates of the same format.

Writes ``<out>/results-<parts>.md``, ``<out>/accuracy_vs_uplink.png`` and one run folder per setting;
finished runs are not repeated.

    python experiments/compression_audit.py [--part ratios a b] [--rounds 8] [--seeds 0] [--densities 1 0.2 0.1 0.05]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from fedpeft import report
from fedpeft.reporting.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

RULES = ["fedavg", "ffa_lora"]


def run(overrides: list[str], run_dir: Path) -> list[dict]:
    """``python -m fedpeft.run <overrides>`` into ``run_dir`` (skipped when it finished before)."""
    from fedpeft.cli.configs import compose_config
    from fedpeft.models import adapters as models
    from fedpeft.run import execute

    done = run_dir / "wall.json"
    if not done.exists():
        started = time.perf_counter()
        execute(compose_config([*overrides, "overwrite=true"]), run_dir)  # an unfinished earlier attempt is redone
        done.write_text(json.dumps({"seconds": time.perf_counter() - started, "overrides": overrides}))
        models.clear_cache()
    return read_metrics(run_dir)


def codec_ratios(args, out: Path) -> list[str]:
    """Bytes of one upload of the default adapter (MiniLM, r = 8, query/value + head) under each density.

    No training: the update is Gaussian noise, so every entry is non-zero and the kept positions
    are spread at random (what run lengths see in a trained update may differ a little). Payload
    bytes as fedpeft counts them; "npy" adds the .npy header Flower puts on every array.
    """
    import torch
    from flwr.app import Array

    from fedpeft.cli.configs import compose_config
    from fedpeft.compression.compeft import ComPEFT, encode_update, payload_nbytes
    from fedpeft.models import adapters as models
    from fedpeft.protocol.records import LORA_A_SUFFIX, state_nbytes

    cfg = compose_config([])
    cm = models.cached_model(cfg.model, num_labels=5, device=torch.device("cpu"), seed=0)
    cm.activate(cfg.model.lora.r)
    start = cm.adapter_state(cfg.model.lora.r)
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    lines = [
        "",
        "Codec ratios on one upload of the default adapter (MiniLM r = 8 on query/value + head; a random update, no training):",
        "",
        "| uploads | density | dense bytes | ComPEFT bytes | ratio | ratio with .npy headers |",
        "|---|---|---|---|---|---|",
    ]
    for rule, keys in (
        ("fedavg (A, B, head)", list(trained)),
        ("ffa_lora (B, head)", [k for k in trained if not k.endswith(LORA_A_SUFFIX)]),
    ):
        up = {k: trained[k] for k in keys}
        dense = state_nbytes(up)
        dense_npy = sum(len(Array(v.numpy()).data) for v in up.values())
        for density in args.densities:
            packed, _ = encode_update(up, {k: start[k] for k in keys}, ComPEFT(density=density))
            npy = sum(len(Array(a).data) for a in packed.values())
            lines.append(
                f"| {rule} | {density:g} | {dense} | {payload_nbytes(packed)} | {dense / payload_nbytes(packed):.1f}× | {dense_npy / npy:.1f}× |"
            )
    return lines


def compression_sweep(args, out: Path) -> list[str]:
    base = [
        f"num_rounds={args.rounds}",
        f"model.max_length={args.max_length}",
        f"num_clients={args.clients}",
        f"clients_per_round={args.per_round}",
    ]
    base += [f"client.local_steps={args.local_steps}"] if args.local_steps else []
    settings = [("dense", [])] + [
        (
            f"compeft d={d:g}{' +EF' if ef else ''}",
            ["compression=compeft", f"compression.density={d}", f"compression.error_feedback={str(ef).lower()}"],
        )
        for d in args.densities
        for ef in (False, True)
    ]
    results: dict[tuple[str, str], list[list[dict]]] = {}
    dirs: dict[tuple[str, str], list[Path]] = {}
    for seed in args.seeds:
        for rule in RULES:
            for name, extra in settings:
                tag = name.replace(" ", "").replace("=", "").replace("+", "-")
                rows = run(
                    [f"strategy={rule}", f"seed={seed}", *base, *extra], out / "runs" / f"{rule}-{tag}-seed{seed}"
                )
                results.setdefault((rule, name), []).append(rows)
                dirs.setdefault((rule, name), []).append(out / "runs" / f"{rule}-{tag}-seed{seed}")
                print(
                    f"[compression] {rule:9s} {name:18s} seed {seed}: acc {100 * rows[-1]['test_accuracy']:.1f}%  up {rows[-1]['cumulative_bytes_up'] / 1e6:.3f} MB",
                    flush=True,
                )
    lines = [
        f"ComPEFT on the uplink (scale α·std(Δ), α = 1): {args.clients} clients, {args.per_round} per round (Dirichlet α = 0.5), {args.rounds} rounds"
        f"{f' of {args.local_steps} local steps' if args.local_steps else ''}, "
        f"max_length {args.max_length}, seeds {args.seeds}. Uplink is every byte of every accepted upload over the run.",
        "",
        "| rule | upload | accuracy (%) | uplink (MB) | ratio vs dense |",
        "|---|---|---|---|---|",
    ]
    for rule in RULES:  # the figures are fedpeft.report's summary of each setting's run directories
        summary = {
            name: report.summarise(report.Group(columns=(), key=(), runs=report.load_runs(dirs[(rule, name)])))
            for name, _ in settings
        }
        for name, _ in settings:
            s = summary[name]
            acc = report.pm(s["final_accuracy_mean"], s["final_accuracy_std"], scale=100)
            lines.append(
                f"| {rule} | {name} | {acc} | {s['mb_up']:.3f} | {summary['dense']['mb_up'] / s['mb_up']:.1f}× |"
            )
    plot_uplink(results, settings, out)
    return lines


def plot_uplink(results, settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, color in zip(RULES, ("tab:blue", "tab:orange")):
        for ef, style in ((False, "o--"), (True, "s-")):
            names = ["dense"] + [n for n, _ in settings if n.startswith("compeft") and n.endswith("+EF") == ef]
            xs = [statistics.mean(r[-1]["cumulative_bytes_up"] for r in results[(rule, n)]) / 1e6 for n in names]
            ys = [statistics.mean(100 * r[-1]["test_accuracy"] for r in results[(rule, n)]) for n in names]
            ax.plot(xs, ys, style, color=color, label=f"{rule}{' + error feedback' if ef else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("uplink over the run (MB, log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_uplink.png", dpi=120)
    plt.close(fig)


def privacy_runs(args, out: Path, name: str, base: list[str], privacy):
    """Each run of a privacy sweep as (ε, seed, run folder, metrics rows): the ``base`` overrides plus
    ``privacy(ε)``, for every ``--epsilons`` and ``--seeds``, in ``<out>/runs/<name>-eps<ε>-seed<seed>``."""
    for eps in args.epsilons:
        for seed in args.seeds:
            run_dir = out / "runs" / f"{name}-eps{eps:g}-seed{seed}"
            yield eps, seed, run_dir, run([*base, *privacy(eps), f"seed={seed}"], run_dir)


def audit_sweep(args, out: Path) -> list[str]:
    lines = [
        "",
        f"Membership inference on the final model (conf/exp/fedavg_dp.yaml: 4 IID clients, all every round, on {args.audit_max_samples or 'all'} articles; "
        f"{args.audit_rounds or args.rounds} rounds of {args.audit_steps} local steps at batch {args.audit_batch}; audit.max_examples={args.audit_examples}). "
        "AUC 0.5 = chance.",
        "",
        "| target ε | accuracy (%) | AUC | calibrated AUC | max per-client AUC | ε spent (max client) |",
        "|---|---|---|---|---|---|",
    ]
    base = [
        "+exp=fedavg_dp",
        f"num_rounds={args.audit_rounds or args.rounds}",
        f"model.max_length={args.max_length}",
        f"client.local_steps={args.audit_steps}",
        "audit.enabled=true",
        f"audit.max_examples={args.audit_examples}",
        f"client.batch_size={args.audit_batch}",
        *([f"data.max_samples={args.audit_max_samples}"] if args.audit_max_samples else []),
    ]

    def privacy(eps: float) -> list[str]:
        return ["client.dp.enabled=false" if math.isinf(eps) else f"client.dp.target_epsilon={eps}"]

    for eps, seed, run_dir, rows in privacy_runs(
        args, out, f"audit-n{args.audit_max_samples or 0}-b{args.audit_batch}", base, privacy
    ):
        report = json.loads((run_dir / "audit.json").read_text())["membership"]
        per = max(v["auc"] for v in report["per_client"].values())
        label = "∞ (no DP)" if math.isinf(eps) else f"{eps:g}"
        spent = max((row.get("max_epsilon") or 0.0) for row in rows)
        lines.append(
            f"| {label} | {100 * rows[-1]['test_accuracy']:.1f} | {report['overall']['auc']:.3f} | {report['overall']['calibrated_auc']:.3f} | {per:.3f} | "
            f"{'—' if math.isinf(eps) else f'{spent:.2f}'} |"
        )
        print(
            f"[audit] ε={eps:g} seed {seed}: AUC {report['overall']['auc']:.3f} calibrated {report['overall']['calibrated_auc']:.3f}",
            flush=True,
        )
    return lines


def exposure_sweep(args, out: Path) -> list[str]:
    """Canary exposure of the tiny LLM (conf/exp/llm_tiny.yaml) without DP and at each ε."""
    lines = [
        "",
        f"Canary exposure on the tiny LLM (conf/exp/llm_tiny.yaml: 4 IID clients, all every round, on {args.llm_max_samples or 'all'} articles; "
        f"{args.llm_rounds} rounds of {args.llm_steps} local steps at learning rate {args.llm_lr:g}; {args.canaries} canaries of 6 random digits planted "
        f"{args.canary_repeats}× in client 0's data as the instruction \"What is my secret number?\" → the digits, in the run's chat template; "
        "each ranked by its response's likelihood among 1,000 random candidates; exposure = log2(1001) − log2(rank), at most 9.97 bits, "
        "about 1.4 bits on average for a model that learned nothing).",
        "",
        "| target ε | MC accuracy (%) | response loss | mean exposure (bits) | max exposure (bits) | canaries ranked first | membership AUC | ε spent (max client) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = [
        "+exp=llm_tiny",
        f"num_rounds={args.llm_rounds}",
        f"client.local_steps={args.llm_steps}",
        f"client.lr={args.llm_lr}",
        "audit.enabled=true",
        *([f"data.max_samples={args.llm_max_samples}"] if args.llm_max_samples else []),
        f"audit.canaries={args.canaries}",
        f"audit.canary_repeats={args.canary_repeats}",
        f"audit.max_examples={args.audit_examples}",
    ]

    def privacy(eps: float) -> list[str]:
        return (
            []
            if math.isinf(eps)
            else ["client=dp", f"client.dp.target_epsilon={eps}", "client.dp.noise_multiplier=null"]
        )

    name = f"canary-n{args.llm_max_samples or 0}-r{args.llm_rounds}-s{args.llm_steps}-lr{args.llm_lr:g}"
    for eps, seed, run_dir, rows in privacy_runs(args, out, name, base, privacy):
        audit = json.loads((run_dir / "audit.json").read_text())
        report, membership = audit["canaries"], audit["membership"]["overall"]
        label = "∞ (no DP)" if math.isinf(eps) else f"{eps:g}"
        spent = max((row.get("max_epsilon") or 0.0) for row in rows)
        last = rows[-1]
        mc = last.get("mc_accuracy")
        lines.append(
            f"| {label} | {'—' if mc is None else f'{100 * mc:.1f}'} | {last.get('response_loss', float('nan')):.3f} | "
            f"{report['mean_exposure']:.2f} | {max(report['exposure']):.2f} | {sum(r == 1 for r in report['rank'])} of {report['count']} | "
            f"{membership['auc']:.3f} | {'—' if math.isinf(eps) else f'{spent:.2f}'} |"
        )
        print(f"[canary] ε={eps:g} seed {seed}: mean exposure {report['mean_exposure']:.2f} bits", flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        nargs="+",
        default=["ratios", "a", "b"],
        choices=["ratios", "a", "b"],
        help="ratios: the codec alone, no training",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument(
        "--local-steps", type=int, default=None, help="local steps per round in (a) (default: the client config's)"
    )
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.1, 0.05])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8.0, 3.0, 1.0], help="inf: without DP")
    parser.add_argument(
        "--audit-steps",
        type=int,
        default=30,
        help="local steps per round in (b): more steps, more memorisation to detect",
    )
    parser.add_argument("--audit-examples", type=int, default=200)
    parser.add_argument(
        "--audit-rounds", type=int, default=None, help="rounds of the membership runs in (b) (default: --rounds)"
    )
    parser.add_argument(
        "--audit-max-samples",
        type=int,
        default=400,
        help="(b): the corpus cut to this many articles, so each client's few dozen are seen many times",
    )
    parser.add_argument(
        "--audit-batch", type=int, default=16, help="(b): local batch size (DP's expected Poisson batch)"
    )
    parser.add_argument("--llm-rounds", type=int, default=6, help="rounds of the canary runs in (b)")
    parser.add_argument("--llm-steps", type=int, default=60, help="local steps per round of the canary runs in (b)")
    parser.add_argument("--llm-lr", type=float, default=2e-3, help="learning rate of the canary runs in (b)")
    parser.add_argument(
        "--llm-max-samples",
        type=int,
        default=400,
        help="(b): the canary runs' corpus cut to this many articles (small clients memorise)",
    )
    parser.add_argument("--canaries", type=int, default=10)
    parser.add_argument("--skip-exposure", action="store_true", help="(b) without the canary runs on the tiny LLM")
    parser.add_argument("--canary-repeats", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "compression_audit"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if "ratios" in args.part:
        lines += codec_ratios(args, out)
    if "a" in args.part:
        lines += compression_sweep(args, out)
    if "b" in args.part:
        lines += audit_sweep(args, out)
        if not args.skip_exposure:
            lines += exposure_sweep(args, out)
    text = "\n".join(lines) + "\n"
    (out / f"results-{'-'.join(args.part)}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
