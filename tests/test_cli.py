"""``python -m fedpeft.run`` as a person meets it: one-line start errors, no stray directories, --help.

No Ray is started here: every command ends before it (that is the point).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedpeft.cli.configs import compose_config
from tests.conftest import REPO
from tests.fedpeft.test_run_dirs import fake_checkpoint


def fedpeft_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft.run", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_start_error_is_one_line_and_leaves_no_run_directory(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    done = fedpeft_run("client.batch_size=0", f"hydra.run.dir={run_dir}")
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr == "error: client.batch_size must be >= 1, got 0\n"
    assert not (tmp_path / "outputs").exists()


def test_a_directory_holding_another_run_is_refused_in_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    done = fedpeft_run("+exp=smoke", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    assert done.stderr == (
        f"error: {tmp_path} holds another run (metrics, checkpoint or final model): choose another hydra.run.dir, "
        f"continue it with resume={tmp_path}, or replace it with overwrite=true\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "strategy.lamda=0.1",
            "key 'lamda' not in 'FedAvgConfig'; Could not override 'strategy.lamda'; To append to your config use +strategy.lamda=0.1",
        ),
        (
            "strategy=fedavgg",
            "could not find 'strategy/fedavgg'; options in 'strategy': fedavg, fedex_lora, fedsa_lora, fedsvd, ffa_lora, flexlora, flora, hetlora, lora_fair, rolora",
        ),
    ],
)
def test_a_hydra_composition_error_is_one_line_and_leaves_no_run_directory(tmp_path, override, line):
    run_dir = tmp_path / "outputs" / "run"
    done = fedpeft_run(override, f"hydra.run.dir={run_dir}")
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr == f"error: {line}\n"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_verbose_shows_the_traceback_of_a_start_error(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    done = fedpeft_run("client.batch_size=0", "verbose=true", f"hydra.run.dir={run_dir}")
    assert done.returncode == 1 and "Traceback" in done.stderr and "fedpeft/cli/checks.py" in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_resuming_a_finished_run_says_so_and_starts_nothing(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    args = ["+exp=smoke", "num_rounds=2", f"resume={finished}"]
    fake_checkpoint(finished, compose_config(args), round_=2)
    done = fedpeft_run(*args, f"hydra.run.dir={tmp_path / 'fresh'}")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == f"resume={finished}: that run already finished (2 of 2 rounds, final accuracy 70.0%); nothing to resume\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished"]  # no new, empty run directory


def test_help_lists_the_groups_and_the_schemas_field_help():
    done = fedpeft_run("--help")
    assert done.returncode == 0
    assert "schema" not in done.stdout
    assert (
        "  strategy=  fedavg | fedex_lora | fedsa_lora | fedsvd | ffa_lora | flexlora | flora | hetlora | lora_fair | rolora"
        in done.stdout
    )
    assert "  +exp=      centralized |" in done.stdout
    assert (
        "  strategy.ranks=null\n      Per-client LoRA ranks (length num_clients); None: every client uses model.lora.r."
        in done.stdout
    )
    assert "  client.dp.grad_sample_mode=lora\n" in done.stdout
