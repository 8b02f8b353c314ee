"""The console: fedpeft's lines only (everything else in run.log), and the lines themselves."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from fedpeft.cli import console
from fedpeft.cli.configs import compose_config
from fedpeft.cli.resume import resume_advice
from fedpeft.reporting import logs
from fedpeft.reporting.lines import round_line
from tests.conftest import REPO


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, list(logging.getLogger("flwr").handlers))
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("flwr").handlers[:] = saved[2]
    logging.captureWarnings(False)


def _emit_everything() -> None:
    logging.getLogger("fedpeft").info("round 1/2  acc 50.0%")
    logging.getLogger("flwr").debug("Registered 2 nodes")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    logging.getLogger("fedpeft").warning("round 2: node 7 failed: boom")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_noise_goes_to_run_log_and_verbose_brings_it_back(tmp_path, capsys, restore_logging, verbose):
    logs.setup_logging(tmp_path / "run.log", verbose=verbose)
    _emit_everything()
    out, err = capsys.readouterr()
    logged = (tmp_path / "run.log").read_text()
    for text in (
        "round 1/2  acc 50.0%",
        "Registered 2 nodes",
        "setup plugin alembic",
        "is_gradient_checkpointing",
        "node 7 failed",
    ):
        assert text in logged
    if verbose:
        assert "Registered 2 nodes" in out + err and "setup plugin alembic" in out + err
    else:
        assert out == "round 1/2  acc 50.0%\n"
        assert err == "warning: round 2: node 7 failed: boom\n"


def test_a_ray_worker_writes_only_to_run_log(tmp_path):
    """The worker hook re-points the process's stdout/stderr (progress bars, tracebacks) at run.log."""
    code = (
        "import os, sys, logging, warnings; from fedpeft.reporting import logs; logs.worker_setup(); "
        "print('progress bar'); sys.stderr.write('a traceback\\n'); os.write(2, b'from C\\n'); "
        "warnings.warn('old', FutureWarning); logging.getLogger('flwr').warning('Manually terminating')"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        logs.ENV_RUN_LOG: str(tmp_path / "run.log"),
        logs.ENV_VERBOSE: "0",
    }
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    logged = (tmp_path / "run.log").read_text()
    for text in ("progress bar", "a traceback", "from C", "FutureWarning: old", "Manually terminating"):
        assert text in logged
    assert logged.count("Manually terminating") == 1  # Flower's own console handler is gone


def test_round_line_and_summary():
    rows = [
        {"round": 1, "test_accuracy": 0.5, "test_loss": 1.2345, "train_loss": 1.5, "clients_sampled": 4, "clients_replied": 3, "clients_failed": 1,
         "bytes_up": 1_500_000, "bytes_down": 2_000_000, "cumulative_bytes_up": 1_500_000, "cumulative_bytes_down": 2_000_000},
        {"round": 2, "test_accuracy": None, "test_loss": None, "train_loss": 1.1, "clients_sampled": 4, "clients_replied": 4,
         "bytes_up": 1_500_000, "bytes_down": 2_000_000, "cumulative_bytes_up": 3_000_000, "cumulative_bytes_down": 4_000_000},
        {"round": 3, "test_accuracy": 0.25, "test_loss": 2.0, "train_loss": 1.0, "clients_sampled": 4, "clients_replied": 4,
         "bytes_up": 1_500_000, "bytes_down": 2_000_000, "cumulative_bytes_up": 4_500_000, "cumulative_bytes_down": 6_000_000},
    ]  # fmt: skip
    line = round_line(rows[0], num_rounds=10, elapsed=65, eta=3600)
    assert (
        line
        == "round  1/10  acc  50.0%  loss 1.234  train 1.500  clients 3/4 (1 failed)  up 1.50 MB  down 2.00 MB  0:01:05 (ETA 1:00:00)"
    )
    assert "acc      -  loss     -" in round_line(rows[1], num_rounds=10, elapsed=1, eta=1)
    cfg = compose_config(["+exp=smoke"])
    summary = console.summary_lines(rows, cfg=cfg, run_dir=REPO / "x", seconds=125, num_labels=5)
    assert (
        summary[0] == "done: 3 rounds in 0:02:05; final accuracy 25.0%, best 50.0% (round 1); 4.50 MB up, 6.00 MB down"
    )


def test_summary_says_where_the_adapter_is_and_how_to_load_it(tmp_path):
    (tmp_path / "final_adapter").mkdir()
    cfg = compose_config(["+exp=smoke"])
    summary = "\n".join(
        console.summary_lines([{"round": 1, "test_accuracy": 0.5}], cfg=cfg, run_dir=tmp_path, seconds=1, num_labels=5)
    )
    assert f"adapter {tmp_path / 'final_adapter'}" in summary
    assert "load: PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained('" in summary
    assert f"num_labels=5), '{tmp_path / 'final_adapter'}')" in summary


def test_header_names_rule_model_data_clients_engine_dp_and_run_dir(tmp_path):
    cfg = compose_config(["+exp=flora_hetero", "client=dp"])
    text = "\n".join(console.header_lines(cfg, tmp_path, device="cpu"))
    assert text.startswith("fedpeft: FLoRA (strategy=flora), 10 rounds, seed 0")
    for fragment in ("model   embedded:minilm", "data    embedded:bbc", "ranks 16 8 4 4 2 2 1 1 1 1", "engine  Flower simulation on Ray", "device cpu",
                     "DP      DP-SGD, target epsilon 8", f"run dir {tmp_path}"):  # fmt: skip
        assert fragment in text


def test_resume_advice_only_when_a_round_finished(tmp_path):
    assert resume_advice(tmp_path, ["+exp=smoke"]).startswith("no round finished, so there is nothing to resume")
    import torch

    torch.save({"round": 3}, tmp_path / "checkpoint.pt")
    advice = resume_advice(tmp_path, ["+exp=smoke", "hydra.run.dir=/x", "seed=2", "overwrite=true"])
    assert (
        advice
        == f"round 3 is the last complete one (checkpointed in {tmp_path}); continue with: python -m fedpeft.run +exp=smoke seed=2 resume={tmp_path}"
    )
