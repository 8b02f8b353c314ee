"""A run never silently writes over another run; resuming a finished run does nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft.cli.configs import compose_config
from fedpeft.config.schema import to_json
from fedpeft.run import FinishedRun, RunDirError, claim_run_dir, run_config

SMOKE = ["+exp=smoke", "num_rounds=2"]


def fake_checkpoint(run_dir, cfg, *, round_: int) -> None:
    """The fields of ``checkpoint.pt`` that deciding "finished?" reads (written by fedpeft.server.loop)."""
    rows = [{"round": r, "test_accuracy": 0.5 + r / 10} for r in range(1, round_ + 1)]
    state = {
        "round": round_,
        "totals": {"up": 1, "down": 1},
        "rows": rows,
        "config": to_json(dataclasses.replace(run_config(cfg), resume=None)),
    }
    torch.save(state, run_dir / "checkpoint.pt")


def test_a_directory_holding_another_run_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(RunDirError, match=rf"{tmp_path} holds another run .*resume={tmp_path}.*overwrite=true"):
        claim_run_dir(compose_config(SMOKE), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_overwrite_removes_the_previous_runs_results_and_nothing_else(tmp_path):
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "run.log", "config.yaml", "notes.txt"):
        (tmp_path / name).write_text("old")
    for folder in ("final_model", "final_adapter", "nodes/node-0", ".hydra"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x").write_text("old")
    claim_run_dir(compose_config([*SMOKE, "overwrite=true"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_started_but_empty_directory_is_reused(tmp_path):
    """A run stopped before its first round left only its config and log: nothing to protect."""
    (tmp_path / "config.yaml").write_text("old")
    (tmp_path / "metrics.jsonl").write_text("")
    assert claim_run_dir(compose_config(SMOKE), tmp_path) == tmp_path
    assert not (tmp_path / "config.yaml").exists()


def test_resuming_a_finished_run_does_nothing(tmp_path):
    cfg = compose_config([*SMOKE, f"resume={tmp_path}"])
    fake_checkpoint(tmp_path, cfg, round_=2)
    with pytest.raises(FinishedRun) as done:
        claim_run_dir(cfg, tmp_path / "fresh")
    assert done.value.args[0] == tmp_path and done.value.args[1]["round"] == 2
    fake_checkpoint(tmp_path, cfg, round_=1)  # interrupted after round 1: resumed in its own directory
    assert claim_run_dir(cfg, tmp_path / "fresh") == tmp_path


def test_resume_options_that_only_change_the_console_still_match(tmp_path):
    cfg = compose_config([*SMOKE, f"resume={tmp_path}"])
    fake_checkpoint(tmp_path, cfg, round_=1)
    assert claim_run_dir(compose_config([*SMOKE, f"resume={tmp_path}", "verbose=true"]), tmp_path / "x") == tmp_path
