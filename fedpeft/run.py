"""Entry point: ``python -m fedpeft.run [+exp=<name>] [key=value ...]``.

Composes the Hydra config (typed by :mod:`fedpeft.config.schema`), checks everything that can be checked
before Ray starts (:mod:`fedpeft.cli.checks`), claims the run directory, and runs the chosen mode with
a quiet console (:mod:`fedpeft.reporting.logs`, :mod:`fedpeft.cli.console`).

What a person gets:

* a mistake found before the start: one line (``verbose=true`` adds the traceback), exit 1, and no
  run directory left behind;
* a run directory that holds another run is refused (``overwrite=true`` replaces it); resuming a
  finished run says so and exits 0 without starting Ray;
* the first Ctrl-C stops the run within seconds, says how to resume from the last complete round
  and exits 130; a fatal error of Flower or Ray does the same with exit 1. No Ray process is left.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import _save_config
from omegaconf import DictConfig, OmegaConf

from fedpeft.audit import run_audit, summary
from fedpeft.cli import console, signals
from fedpeft.cli.checks import check_config, check_run  # noqa: F401  (check_config: for callers of fedpeft.run)
from fedpeft.cli.configs import register_configs
from fedpeft.cli.errors import composition_error, one_line
from fedpeft.cli.help import help_text
from fedpeft.cli.resume import resume_advice
from fedpeft.config.schema import Config, to_config
from fedpeft.data.partition import prepare
from fedpeft.engines.deploy.submit import stop_submitted, submit
from fedpeft.engines.ray import run_simulation
from fedpeft.models.adapters import resolve_device
from fedpeft.reporting import logs
from fedpeft.reporting.lines import pct
from fedpeft.reporting.status import write_partition_report
from fedpeft.server.baselines import run_centralized, run_local_only
from fedpeft.server.checkpoint import load_checkpoint

log = logging.getLogger("fedpeft")

register_configs()

# What a run writes into its directory; ``overwrite=true`` removes exactly these, nothing else.
RUN_FILES = (
    "config.yaml", ".hydra", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "final_adapter", "final_model", "nodes",
    "plots", "run.log", "flwr-app", "flwr-home", "flwr-run.log", "deploy-done.json", "deploy-error.txt",
    "partitions.json", "nodes.json", "tensorboard",
)  # fmt: skip


class RunDirError(ValueError):
    """The run directory cannot be used as asked (holds another run, no such run to resume)."""


class FinishedRun(Exception):
    """``resume=`` names a run that already ran all its rounds: nothing to do."""


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has results of a run that got past its start (a round, a checkpoint, a final model)."""
    metrics = run_dir / "metrics.jsonl"
    return (
        (metrics.exists() and metrics.stat().st_size > 0)
        or (run_dir / "checkpoint.pt").exists()
        or (run_dir / "final_adapter").exists()
        or (run_dir / "final_model").exists()
    )


def clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def finished(state: dict[str, Any], cfg: Config) -> bool:
    """A checkpoint of a run that has nothing left to do: every round, or the communication budget spent."""
    if state["round"] >= cfg.num_rounds:
        return True
    spent = (state["totals"]["up"] + state["totals"]["down"]) / 1e6
    return cfg.comm_budget_mb is not None and spent >= cfg.comm_budget_mb


def run_config(cfg: Config) -> Config:
    """``cfg`` without the console-only options: what the checkpoint and the clients see."""
    return dataclasses.replace(cfg, verbose=False, overwrite=False)


def claim_run_dir(cfg: Config, run_dir: Path) -> Path:
    """The directory this run writes to; refuses one that holds another run unless ``overwrite=true``.

    With ``resume=`` it is the resumed run's directory; a finished run raises :class:`FinishedRun`.
    """
    if cfg.resume:
        run_dir = Path(cfg.resume).expanduser()
        if not run_dir.is_dir():
            raise RunDirError(f"resume={cfg.resume!r}: no such run directory")
        if cfg.mode in ("centralized", "local"):
            raise RunDirError("resume works for federated runs (mode=simulation or mode=deploy)")

        state = load_checkpoint(run_dir, run_config(cfg))  # fails now, not after Ray started, if it does not fit
        if finished(state, cfg):
            raise FinishedRun(run_dir, state)
        return run_dir
    if holds_run(run_dir):
        if not cfg.overwrite:
            raise RunDirError(
                f"{run_dir} holds another run (metrics, checkpoint or final model): choose another hydra.run.dir, "
                f"continue it with resume={run_dir}, or replace it with overwrite=true"
            )
        log.info("overwrite=true: removing the previous run's results from %s", run_dir)
    clear_run(run_dir)
    return run_dir


def execute(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Check ``cfg``, claim ``run_dir``, write the config and run it; returns the metrics rows.

    (The console set-up, Ctrl-C and the one-line errors are :func:`main`'s; tests call this.)
    """
    data = check_run(cfg)
    run_dir = claim_run_dir(cfg, Path(run_dir))
    return launch(run_config(cfg), run_dir, data=data)


def launch(cfg: Config, run_dir: Path, *, data: Any = None) -> list[dict[str, Any]]:
    """Write ``config.yaml`` (``resume`` left out) and run the chosen mode."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # a resumed run's config is the checkpoint's (or, with another num_rounds, the lengthened one)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(cfg, resume=None))))
    if cfg.mode == "simulation":
        data = (
            data
            if data is not None
            else prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
        )
        write_partition_report(data, cfg, run_dir)
    if cfg.mode == "centralized":
        return run_centralized(cfg, run_dir)
    if cfg.mode == "local":
        return run_local_only(cfg, run_dir)
    if cfg.mode == "deploy":
        rows = submit(cfg, run_dir)
        results_dir = Path(cfg.deploy.run_dir or run_dir)
    else:
        rows, results_dir = run_simulation(cfg, run_dir), run_dir
    if cfg.audit.enabled and rows:
        log.info("privacy audit:\n%s", summary(run_audit(results_dir, cfg=cfg)))
    return rows


# ------------------------------------------------------------------------------ the command
STARTED = time.time()


def created_here(path: Path) -> bool:
    """An empty directory made by this process (Hydra makes the run directory before ``main`` runs)."""
    try:
        return path.is_dir() and not any(path.iterdir()) and path.stat().st_mtime >= STARTED - 1.0
    except OSError:
        return False


def discard(path: Path) -> None:
    """Remove ``path`` and its parents (``outputs/<date>``) where this process made them and left them empty."""
    cwd = Path.cwd().resolve()
    path = path.resolve()
    while path != cwd and path != path.parent and created_here(path):
        path.rmdir()
        path = path.parent


def save_hydra_files(run_dir: Path, dcfg: DictConfig) -> None:
    """Hydra's own record of the run (``.hydra/``: the composed config, Hydra's config, the overrides)."""

    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    _save_config(dcfg, "config.yaml", out)
    _save_config(OmegaConf.create({"hydra": hydra_cfg}), "hydra.yaml", out)
    _save_config(OmegaConf.create(list(hydra_cfg.overrides.task)), "overrides.yaml", out)  # type: ignore[arg-type]  # Hydra saves any config


def fail(message: str, *, verbose: bool, code: int = 1) -> None:
    if verbose:
        log.exception("%s", message)
    else:
        log.error("%s", message)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="pkg://fedpeft.conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    verbose = bool(OmegaConf.select(dcfg, "verbose", default=False, throw_on_missing=False))
    logs.setup_logging(None, verbose=verbose)

    def stopped_at_start() -> list[tuple[str, Path | None]]:
        discard(hydra_dir)
        return [("interrupted before the run started; nothing was written", None)]

    signals.on_interrupt(stopped_at_start)
    # ------------------------------------------------------------- before anything starts
    try:
        cfg = to_config(dcfg)
        data = check_run(cfg)
        run_dir = claim_run_dir(cfg, hydra_dir)
    except FinishedRun as done:
        run_dir, state = done.args
        final = state["rows"][-1].get("test_accuracy") if state["rows"] else None
        discard(hydra_dir)
        log.info(
            "resume=%s: that run already finished (%d of %d rounds, final accuracy %s); nothing to resume",
            run_dir,
            state["round"],
            cfg.num_rounds,
            pct(final),
        )
        return final
    except Exception as err:  # every start error: one line, no run directory
        discard(hydra_dir)
        fail(
            one_line(err) + ("" if isinstance(err, ValueError) or verbose else " (verbose=true shows the traceback)"),
            verbose=verbose,
        )
    if run_dir != hydra_dir:
        discard(hydra_dir)  # resume: the resumed run's directory is used, the fresh one is not needed
    # ------------------------------------------------------------- the run
    run_dir.mkdir(parents=True, exist_ok=True)
    run_log = run_dir / logs.RUN_LOG
    logs.setup_logging(run_log, verbose=verbose)
    if not cfg.resume:
        save_hydra_files(run_dir, dcfg)

    console.show(
        console.header_lines(
            cfg, run_dir, data=data, device=str(resolve_device(cfg.device)) if cfg.mode != "deploy" else None
        )
    )

    def stopped() -> list[tuple[str, Path | None]]:
        lines = [("stopped by Ctrl-C", run_log)]
        if cfg.mode == "deploy":
            lines.append((stop_submitted(run_dir), run_log))
        if cfg.mode in ("centralized", "local"):
            return [
                *lines,
                (
                    f"a {'centralised' if cfg.mode == 'centralized' else 'local-only'} run cannot be resumed; its "
                    f"metrics so far are in {run_dir}",
                    run_log,
                ),
            ]
        return [*lines, (resume_advice(results_dir, overrides), run_log)]

    results_dir = (
        Path(cfg.deploy.run_dir).expanduser() if cfg.mode == "deploy" and cfg.deploy.run_dir else run_dir
    )  # where checkpoints go
    signals.on_interrupt(stopped)
    started = time.perf_counter()
    try:
        rows = launch(run_config(cfg), run_dir, data=data)
    except Exception as err:  # a run that cannot go on: its reason, and how to continue if a round finished
        log.debug("the run failed", exc_info=err)
        if verbose:
            log.exception("the run failed")
        log.error("%s", one_line(err))
        log.info("%s", resume_advice(results_dir, overrides))
        signals.stop_now(1)  # Flower's threads may still wait for replies: do not wait for them
    console.show(
        console.summary_lines(
            rows, cfg=cfg, run_dir=run_dir, seconds=time.perf_counter() - started, num_labels=data.num_labels
        )
    )
    return rows[-1].get("test_accuracy") if rows else None  # for Hydra sweepers


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text([a for a in sys.argv[1:] if a not in ("--help", "-h")]))
        sys.exit(0)
    if (problem := composition_error(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    main()
