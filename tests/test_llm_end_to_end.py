"""The LLM path end to end: +exp=llm_tiny as a real Ray simulation of 2 clients x 2 rounds, cut small,
and its saved adapter reproducing the reported metrics in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedpeft.cli.configs import compose_config
from fedpeft.run import execute
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = [
    "+exp=llm_tiny",
    "num_rounds=2",
    "num_clients=2",
    "clients_per_round=2",
    "client.local_steps=2",
    "data.max_samples=60",
    "model.max_length=32",
]


def test_llm_tiny_simulation_reports_llm_metrics_that_the_saved_adapter_reproduces(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))  # the tiny Llama is built for this test
    cfg = compose_config(TINY)
    rows = execute(cfg, tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients_replied"] == 2 and row["train_loss"] > 0
        assert row["response_loss"] > 0 and row["perplexity"] > 1 and 0.0 <= row["mc_accuracy"] <= 1.0
    assert rows[1]["response_loss"] < rows[0]["response_loss"]  # two rounds already lower it from ~24 nats
    assert (tmp_path / "run" / "final_adapter" / "adapter_config.json").exists()
    # A fresh process, plain transformers + peft: the same numbers from the saved adapter.
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDPEFT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "fedpeft.generate", str(tmp_path / "run"), "--evaluate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=True,
    )
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["response_loss"] == pytest.approx(rows[-1]["response_loss"], rel=1e-5)
    assert again["mc_accuracy"] == pytest.approx(rows[-1]["mc_accuracy"], abs=1e-9)
    subprocess.run(  # and it generates (exit status 0)
        [
            sys.executable,
            "-m",
            "fedpeft.generate",
            str(tmp_path / "run"),
            "Which topic is this article about? The match ended 2-2.",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
        check=True,
    )
