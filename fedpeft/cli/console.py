"""What a person sees while a run goes: a header, one line per round, a summary — and nothing else.

Every library's log (Flower's DEBUG lines, Ray, alembic, transformers' warnings and progress bars,
Python warnings) goes to the run's ``run.log`` only, from the driver and from every Ray worker;
``verbose=true`` puts it back on the console. The lines are built by plain functions
(:func:`header_lines`, :func:`round_line`, :func:`summary_lines`) so that a simulated, a deployed
and a centralised run print the same thing.

A run that must end now (Ctrl-C, a fatal error inside Flower or Ray) goes through :func:`stop_now`:
it kills the processes this run started (Ray's, ``flwr run``'s) and exits without waiting for the
threads Flower leaves behind, which is what made a first Ctrl-C hang.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fedpeft")

RUN_LOG = "run.log"
FILE_FORMAT = "[%(asctime)s][%(processName)s %(process)d][%(name)s][%(levelname)s] - %(message)s"
# Read by :func:`worker_setup` in every Ray worker (workers inherit the driver's environment).
ENV_RUN_LOG, ENV_VERBOSE = "FEDPEFT_RUN_LOG", "FEDPEFT_VERBOSE"


# ------------------------------------------------------------------------------ logging
class OnlyFedpeft(logging.Filter):
    """The console's filter when not verbose: fedpeft's own records only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "fedpeft" or record.name.startswith("fedpeft.")


class ConsoleHandler(logging.StreamHandler):
    """Progress to stdout, warnings and errors to stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


class ConsoleFormatter(logging.Formatter):
    """fedpeft's lines as they are; a warning or error says so."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


def quiet_libraries(*, progress_bars: bool = False) -> None:
    """Send the libraries' own console output into the logging tree (and so into ``run.log``)."""
    logging.captureWarnings(True)  # FutureWarnings and the like become log records
    try:
        import flwr.common.logger  # noqa: F401  (it adds its console handler on import: import it before removing it)
    except ImportError:
        pass
    for name in ("flwr", "ray"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # Flower's coloured console handler, Ray's stderr handler
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if not progress_bars:
            hf_logging.disable_progress_bar()  # "Loading weights" bars
    except ImportError:
        pass
    if not progress_bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_logging(run_log: Path | None, *, verbose: bool) -> None:
    """Console: fedpeft's lines (everything when ``verbose``); ``run_log``: everything, from every process.

    Called again once the run directory is known (the first call, before the checks, has no file).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    console = ConsoleHandler()
    console.setFormatter(ConsoleFormatter() if not verbose else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(OnlyFedpeft())
    root.addHandler(console)
    logging.getLogger("fedpeft").setLevel(logging.DEBUG)
    if run_log is not None:
        file = logging.FileHandler(run_log, mode="a", encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        file.setLevel(logging.DEBUG)
        root.addHandler(file)
        os.environ[ENV_RUN_LOG] = str(run_log)
    os.environ[ENV_VERBOSE] = "1" if verbose else "0"
    quiet_libraries(progress_bars=verbose)  # verbose: the same records, shown on the console too


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: a worker's output goes to the run's ``run.log``.

    Its stdout and stderr (progress bars, warnings, tracebacks, Flower's and transformers' logs) are
    re-pointed at ``run.log`` at the file-descriptor level, so nothing of it reaches the console;
    with ``verbose=true`` the driver does not install this hook and Ray forwards them as usual.
    """
    path = os.environ.get(ENV_RUN_LOG)
    if not path or os.environ.get(ENV_VERBOSE) == "1":
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    quiet_libraries()


# ------------------------------------------------------------------------------ the lines
def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def header_lines(cfg: Any, run_dir: Path, *, data: Any = None, device: str | None = None) -> list[str]:
    """What this run is, before it starts: rule, model, data, clients and ranks, engine, device, DP, run dir."""
    from fedpeft.models.adapters import client_ranks  # the header is only built once the config passed its checks
    from fedpeft.strategies import get_strategy

    lora = cfg.model.lora
    peft = getattr(cfg.model, "peft", "lora")
    rule = get_strategy(cfg.strategy.name).__name__
    if cfg.mode == "centralized":
        head = f"fedpeft: centralised LoRA reference (mode=centralized), {cfg.num_rounds} rounds, seed {cfg.seed}"
    elif cfg.mode == "local":
        head = f"fedpeft: local-only bound (mode=local: each client trains alone), {cfg.num_rounds} rounds, seed {cfg.seed}"
    else:
        head = f"fedpeft: {rule} (strategy={cfg.strategy.name}), {cfg.num_rounds} rounds, seed {cfg.seed}"
    lines = [head]
    lines.append(
        f"  model   {cfg.model.name_or_path} ({cfg.model.task}, max_length {cfg.model.max_length}, {cfg.model.dtype}); "
        + (f"LoRA on {', '.join(lora.target_modules)}, alpha {lora.alpha:g} at r={lora.r}" if peft == "lora" else f"peft method {peft}")
        + (f", trains {', '.join(lora.modules_to_save)}" if lora.modules_to_save else "")
    )
    sizes = f": {len(data.train)} train / {len(data.test)} test examples, {data.num_labels} labels" if data is not None else ""
    split = cfg.data.partitioner + (f" (alpha {cfg.data.dirichlet_alpha:g})" if cfg.data.partitioner == "dirichlet" else "")
    lines.append(f"  data    {cfg.data.name}{sizes}; {split} over {cfg.num_clients} clients")
    if cfg.mode != "centralized":
        ranks = client_ranks(cfg)
        if ranks[0] is None:
            shown = f"none (model.peft={cfg.model.peft})"
        else:
            shown = f"all {ranks[0]}" if len(set(ranks)) == 1 else " ".join(map(str, ranks))
        lines.append(f"  clients {cfg.num_clients}, {cfg.clients_per_round} per round; ranks {shown}")
    step = f"{cfg.client.local_steps} local steps" if cfg.client.local_steps > 0 else f"{cfg.client.local_epochs} local epoch(s)"
    decay = f" × {cfg.client.lr_decay:g}^(round-1)" if cfg.client.lr_decay != 1.0 else ""
    lines.append(f"  train   {step}, batch {cfg.client.batch_size}, lr {cfg.client.lr:g}{decay}")
    if cfg.mode == "simulation":
        engine = f"Flower simulation on Ray, {cfg.client.num_cpus:g} CPU / {cfg.client.num_gpus:g} GPU per client"
    elif cfg.mode == "deploy":
        engine = f"Flower deployment: SuperLink {cfg.deploy.superlink} ({'insecure' if cfg.deploy.insecure else 'TLS'})"
    elif cfg.mode == "local":
        engine = "one process, every client in turn, no communication"
    else:
        engine = "one process, pooled data"
    lines.append(f"  engine  {engine}; device {device or cfg.device}")
    dp = cfg.client.dp
    if dp.enabled:
        budget = f"target epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else f"noise multiplier {dp.noise_multiplier:g}"
        lines.append(f"  DP      DP-SGD, {budget}, delta {dp.delta:g}, clip {dp.max_grad_norm:g} ({dp.grad_sample_mode} per-sample gradients)")
    else:
        lines.append("  DP      off")
    lines.append(f"  run dir {run_dir}")
    return lines


def round_line(row: dict[str, Any], *, num_rounds: int, elapsed: float, eta: float) -> str:
    """One round: test accuracy and loss, mean train loss, clients, traffic, time."""
    loss = row.get("test_loss")
    train = row.get("train_loss")
    parts = [
        f"round {row['round']:>{len(str(num_rounds))}}/{num_rounds}",
        f"acc {_pct(row.get('test_accuracy')):>6}",
        f"loss {'-' if loss is None else f'{loss:.3f}':>5}",
        f"train {'-' if train is None else f'{train:.3f}':>5}",
    ]
    if row.get("clients_sampled"):
        clients = f"clients {row.get('clients_replied', 0)}/{row['clients_sampled']}"
        bad = [f"{row[k]} {k.split('_')[1]}" for k in ("clients_failed", "clients_rejected") if row.get(k)]
        parts.append(clients + (f" ({', '.join(bad)})" if bad else ""))
        parts.append(f"up {row.get('bytes_up', 0) / 1e6:.2f} MB  down {row.get('bytes_down', 0) / 1e6:.2f} MB")
    if row.get("max_epsilon") is not None:
        parts.append(f"eps {row['max_epsilon']:.2f}")
    parts.append(f"{hms(elapsed)} (ETA {hms(eta)})")
    return "  ".join(parts)


def load_hint(cfg: Any, artifact: Path, *, num_labels: int | None = None) -> str:
    """The Python that loads the final model or adapter written by the run."""
    from fedpeft.models.adapters import resolve_model_path

    auto = "AutoModelForSequenceClassification" if cfg.model.task == "seq_cls" else "AutoModelForCausalLM"
    if artifact.name == "final_model":
        return f"{auto}.from_pretrained({str(artifact)!r})"
    base = cfg.model.name_or_path
    try:
        base = resolve_model_path(base)
    except ValueError:
        pass
    labels = f", num_labels={num_labels if num_labels else '<labels>'}" if cfg.model.task == "seq_cls" else ""
    return f"PeftModel.from_pretrained({auto}.from_pretrained({base!r}{labels}), {str(artifact)!r})"


def summary_lines(rows: list[dict[str, Any]], *, cfg: Any, run_dir: Path, seconds: float, num_labels: int | None = None) -> list[str]:
    """The end of a run: final and best accuracy, time, traffic, where everything is and how to load it."""
    if not rows:
        return [f"done in {hms(seconds)}; no rounds recorded here (a deployed run writes its results on the SuperLink's machine)"]
    last = rows[-1]
    scored = [r for r in rows if r.get("test_accuracy") is not None]
    best = max(scored, key=lambda r: r["test_accuracy"]) if scored else None
    accuracy = f"final accuracy {_pct(last.get('test_accuracy'))}"
    if best is not None:
        accuracy += f", best {_pct(best['test_accuracy'])} (round {best['round']})"
    traffic = f"{last.get('cumulative_bytes_up', 0) / 1e6:.2f} MB up, {last.get('cumulative_bytes_down', 0) / 1e6:.2f} MB down"
    lines = [f"done: {len(rows)} rounds in {hms(seconds)}; {accuracy}; {traffic}"]
    lines.append(f"  metrics {run_dir / 'metrics.csv'} (per round), metrics.jsonl (and per client)")
    for name in ("final_adapter", "final_model"):
        artifact = run_dir / name
        if artifact.exists():
            lines.append(f"  {'adapter' if name == 'final_adapter' else 'model  '} {artifact}")
            lines.append(f"          load: {load_hint(cfg, artifact, num_labels=num_labels)}")
    lines.append(f"  log     {run_dir / RUN_LOG}")
    return lines


def show(lines: list[str]) -> None:
    for line in lines:
        log.info("%s", line)


# ------------------------------------------------------------------------------ stopping
def checkpoint_round(run_dir: Path) -> int:
    """The last round whose checkpoint is on disk (0: none)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return 0
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["round"])
    except Exception:  # unreadable: it cannot be resumed from either
        return 0


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.", "overwrite=", "+resume="))]
    return " ".join(["python -m fedpeft.run", *kept, f"resume={run_dir}"])


def resume_advice(run_dir: Path, overrides: list[str]) -> str:
    """How to continue a stopped run, or that there is nothing to continue."""
    done = checkpoint_round(run_dir)
    if done == 0:
        return f"no round finished, so there is nothing to resume (the config and run.log are in {run_dir})"
    return f"round {done} is the last complete one (checkpointed in {run_dir}); continue with: {resume_command(run_dir, overrides)}"


def say(text: str, *, run_log: Path | None = None, stream: int = 1) -> None:
    """Write a line without the logging machinery: safe inside a signal handler that interrupted a log call."""
    data = (text + "\n").encode("utf-8", errors="replace")
    try:
        os.write(stream, data)
    except OSError:
        pass
    if run_log is not None:
        try:
            with open(run_log, "ab") as fh:
                fh.write(b"[fedpeft] " + data)
        except OSError:
            pass


def kill_children_after_exit() -> None:
    """Have every process this one started (Ray's GCS, raylet and workers; ``flwr run``) SIGKILLed
    right after this process exits, by a forked reaper.

    Not before: a Ray driver whose raylet dies ends its own process at once with exit code 1, which
    would race the exit code of a Ctrl-C (130). The reaper holds this process's stdout open until
    its work is done, so whoever reads the output sees its end only once the children are gone.
    """
    import psutil

    try:
        pids = [child.pid for child in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return
    if not pids:
        return
    parent = os.getpid()
    if os.fork() == 0:  # the reaper: only async-signal-safe calls from here on (the parent has threads)
        try:
            deadline = time.monotonic() + 10.0
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.01)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            os._exit(0)


# Held by whoever is ending the process. Ctrl-C kills Ray, which makes the main thread (or one of
# Flower's) fail and call stop_now(1) too: that second caller waits here while the first exits.
_STOPPING = threading.RLock()


def stop_now(code: int) -> None:
    """End the process now: its child processes killed, its log files flushed, no thread waited for.

    The first caller wins: a later one (another thread) blocks until the process is gone, so the
    exit code and the last console lines are the first caller's.
    """
    _STOPPING.acquire()
    # Flower's threads would log the failures that losing Ray causes (actor unavailable, ...): silence them first
    logging.disable(logging.CRITICAL)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    kill_children_after_exit()
    os._exit(code)


def on_interrupt(message: Any) -> None:
    """Install a SIGINT handler: the first Ctrl-C prints ``message()`` and stops the run (exit 130)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        _STOPPING.acquire()  # from now on a failing thread cannot exit with its own code first
        logging.disable(logging.CRITICAL)  # from here on the run's threads print nothing; these lines are the last
        for line, run_log in message():
            say(line, run_log=run_log)
        stop_now(130)

    signal.signal(signal.SIGINT, handler)


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause of a chain (Flower wraps Ray's error twice: 'An error was encountered')."""
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


def one_line(err: BaseException) -> str:
    """An error as one line: fedpeft's own errors by their message, anything else with its type."""
    text = " ".join(str(err).split()) or type(err).__name__
    ours = type(err).__module__.split(".")[0] in ("fedpeft", "clients", "strategies", "__main__")  # __main__: fedpeft.run run with -m
    if ours or type(err) is ValueError:  # fedpeft's checks raise its own errors and plain ValueErrors
        return text
    return f"{type(err).__name__}: {text}"


def composition_error(argv: list[str]) -> str | None:
    """Hydra's own error for these command-line overrides (a misspelled key or option), as one line.

    ``python -m fedpeft.run`` composes the config once before Hydra does, so that a typo costs one
    line instead of Hydra's seven. ``None`` when the overrides compose, and for command lines with
    Hydra flags (``-m``, ``--cfg`` ...), which Hydra itself reports.
    """
    if any(arg.startswith("-") for arg in argv):
        return None
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedpeft.cli.configs import CONF_MODULE, register_configs

    register_configs()
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return hydra_one_line(err)
    return None


def hydra_one_line(err: BaseException) -> str:
    """A Hydra / OmegaConf composition error as one line: what is wrong first, then the advice."""
    skip = ("full_key:", "object_type=", "reference_type=", "provider=", "Config search path", "See https://")
    def lines(e: BaseException) -> list[str]:
        return [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]

    own, cause = lines(err), lines(err.__cause__) if err.__cause__ else []
    if own and own[0].startswith("In '") and "Could not find" in own[0]:  # a missing group option
        group = [ln for ln in own[1:] if ln.startswith("Available options")]
        options = [ln for ln in own[1:] if not ln.startswith("Available options") and not ln.endswith("_schema")]
        where = group[0].rstrip(":").replace("Available options", "options") if group else "options"
        return f"c{own[0].split(': ', 1)[-1][1:]}; {where}: {', '.join(options)}"
    text = "; ".join([*cause, *(ln.rstrip(".") for ln in own)])
    return text[:1].lower() + text[1:] if text else type(err).__name__


# ------------------------------------------------------------------------------ --help
def help_text(overrides: list[str]) -> str:
    """``python -m fedpeft.run --help``: the config groups and every key with its value and help.

    Keys and help come from the typed schema (:mod:`fedpeft.config.schema`), values from the config that
    ``overrides`` compose (so ``+exp=flora_hetero --help`` shows that experiment's values).
    """
    import dataclasses

    from fedpeft.config.schema import Config
    from fedpeft.cli.configs import CONF_DIR, compose_config

    try:
        cfg: Any = compose_config(overrides)
        note = f" (with {' '.join(overrides)})" if overrides else ""
    except Exception as err:
        cfg, note = Config(), f" (defaults; {' '.join(overrides)} did not compose: {one_line(err)})"
    lines = [
        "usage: python -m fedpeft.run [+exp=<experiment>] [group=option ...] [key=value ...]",
        "       python -m fedpeft.run -m key=a,b ...   (a sweep: Hydra multirun)",
        "",
        "Config groups (group=option):",
    ]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml") if f.stem != "schema")
        prefix = "+exp" if group.name == "exp" else group.name
        lines.append(f"  {prefix + '=':<10} {' | '.join(options)}")
    lines += ["", f"Keys, their current values{note}, and what they do:"]

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
                continue
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            help_ = f.metadata.get("help", "")
            lines.append(f"  {key}={shown}" + (f"\n      {help_}" if help_ else ""))

    walk(cfg, "")
    lines += ["", "Hydra's own options: python -m fedpeft.run --hydra-help"]
    return "\n".join(lines)
