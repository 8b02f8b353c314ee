"""Each run's ``plots/`` and TensorBoard scalars, written by the metrics writer every round."""

from __future__ import annotations

import pytest

from fedpeft.reporting.metrics import MetricsWriter
from fedpeft.reporting.plots import mean_curve

PNG = b"\x89PNG\r\n\x1a\n"


def row(rnd: int, acc: float | None) -> dict:
    return {
        "round": rnd, "test_accuracy": acc, "test_loss": None if acc is None else 1.5 - acc, "train_loss": 1.0 / rnd,
        "clients_sampled": 2, "clients_replied": 2, "bytes_up": 1000, "bytes_down": 3000,
        "cumulative_bytes_up": 1000 * rnd, "cumulative_bytes_down": 3000 * rnd,
    }  # fmt: skip


def test_every_round_redraws_the_run_plots(tmp_path):
    writer = MetricsWriter(tmp_path, num_rounds=3)
    writer.write(row(1, 0.4))
    first = (tmp_path / "plots" / "accuracy_loss.png").read_bytes()
    writer.write(row(2, None))  # a round without evaluation
    writer.write(row(3, 0.7))
    for name in ("accuracy_loss.png", "accuracy_vs_mb.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    assert (tmp_path / "plots" / "accuracy_loss.png").read_bytes() != first
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_tensorboard_scalars_hold_each_round(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, num_rounds=2, logger="tensorboard")
    writer.write(row(1, 0.4))
    writer.write(row(2, 0.7))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("test_accuracy")] == [(1, 0.4), (2, 0.7)]
    assert [e.value for e in events.Scalars("cumulative_bytes_down")] == [3000, 6000]


def test_mean_curve_averages_rounds_every_run_evaluated():
    a = [row(1, 0.2), row(2, 0.6)]
    b = [row(1, 0.4), row(2, None), row(3, 0.9)]
    assert mean_curve([a, b]) == [(1, pytest.approx(0.004), pytest.approx(0.3), pytest.approx(0.1414213562373095))]


def test_an_unknown_logger_fails_at_the_start():
    from fedpeft.run import check_config
    from tests.fedpeft.test_config import compose_cfg

    with pytest.raises(ValueError, match=r"logger must be one of \('none', 'tensorboard'\), got 'wandb'"):
        check_config(compose_cfg(["logger=wandb"]))
