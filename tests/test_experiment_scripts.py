"""The bookkeeping of experiments/compare_all_rules.py: how long a sweep run in parts took, which runs it reuses."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

import fedpeft.strategies  # noqa: F401  (registers the rules' config classes, which to_config reads)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_all_rules", REPO / "experiments" / "compare_all_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_span_counts_the_time_any_run_was_going_across_sittings(tmp_path, script):
    # Prepare: a lengthened run (two sittings), a run overlapping its first sitting, and a run
    # written before sittings were kept (one sitting that ends at the file's time)
    runs = {"a": {"seconds": 30, "sittings": [[100, 110], [200, 220]]}, "b": {"seconds": 15, "sittings": [[105, 120]]}}
    for name, wall in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "wall.json").write_text(json.dumps(wall))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "wall.json").write_text(json.dumps({"seconds": 50}))
    os.utime(tmp_path / "old" / "wall.json", (300, 300))
    # Execute
    span = script.sweep_span([tmp_path / n for n in ("a", "b", "old")])
    # Assert: [100, 120] + [200, 220] + [250, 300], the gaps between sittings not counted
    assert span == pytest.approx(20 + 20 + 50)
    assert script.wall_sittings(tmp_path / "old" / "wall.json") == [[250, 300]]


def test_a_swept_run_keeps_its_score_after_it_is_lengthened(tmp_path, script, monkeypatch):
    # Prepare: a sweep run scored after 2 rounds, then lengthened to 4
    run = tmp_path / "homogeneous-fedavg-lr0.01-seed0"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": t}) + "\n" for t in (1, 2)))
    monkeypatch.setattr(script, "validation_score", lambda run_dir: (0.75, -0.5))
    first = script.sweep_score(run, 2)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": t}) + "\n" for t in (1, 2, 3, 4)))
    monkeypatch.setattr(script, "validation_score", lambda run_dir: (0.99, -0.1))  # what the lengthened run would score
    # Execute / Assert: the pick is made on the 2-round score, whenever the script runs again
    assert script.scored(run, 2) and not script.scored(run, 4)
    assert script.sweep_score(run, 2) == first == (0.75, -0.5)
    with pytest.raises(SystemExit, match="ran 4 rounds and has no sweep_score.json for 3"):
        script.sweep_score(run, 3)


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path, script):
    # Prepare: a finished run directory written with a constant learning rate
    from omegaconf import OmegaConf

    from fedpeft.config.schema import to_config, to_container

    run = tmp_path / "homogeneous-fedavg-lr0.01-seed0"
    run.mkdir()
    OmegaConf.save(OmegaConf.create(to_container(to_config({"client": {"lr": 0.01}}))), run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    (run / "wall.json").write_text(json.dumps({"seconds": 1.0}))
    # Execute / Assert: the same settings (another length aside) differ in nothing; a decaying rate is named
    assert script.differs(run, to_config({"client": {"lr": 0.01}, "num_rounds": 40})) == []
    assert script.differs(run, to_config({"client": {"lr": 0.01, "lr_decay": 0.9}})) == [
        "client.lr_decay: 1.0 there, 0.9 asked"
    ]
    with pytest.raises(
        SystemExit, match=r"run with other settings than asked \(client.lr_decay: 1.0 there, 0.9 asked\)"
    ):
        script.run_one(run, {"client": {"lr": 0.01, "lr_decay": 0.9}, "num_rounds": 1})


def test_end_change_is_the_last_quarter_over_the_quarter_before(script):
    from pathlib import Path

    from fedpeft.report import Run

    def run(seed, accuracies):  # 8 rounds, evaluated every second one
        rows = [{"round": t, "test_accuracy": accuracies.get(t)} for t in range(1, 9)]
        return Run(path=Path(f"seed{seed}"), rows=rows, seed=seed, settings={})

    flat, climbing = run(0, {2: 0.5, 4: 0.9, 6: 0.9, 8: 0.9}), run(1, {2: 0.5, 4: 0.6, 6: 0.7, 8: 0.8})
    # quarters of 8 rounds: rounds 7-8 against 5-6
    assert script.end_change([flat]) == pytest.approx(0.0)
    assert script.end_change([climbing]) == pytest.approx(10.0)
    assert script.end_change([flat, climbing]) == pytest.approx(5.0)  # of the mean curve
    assert script.end_change([run(2, {8: 0.9})]) is None  # nothing evaluated in the quarter before


@pytest.mark.parametrize(
    "best, widen, picked, tried",
    [
        (0.02, 2, 0.02, [0.005, 0.01, 0.02, 0.04]),  # inside the grid: nothing more is run
        (0.08, 2, 0.08, [0.005, 0.01, 0.02, 0.04, 0.08, 0.16]),  # the top won: doubled until it no longer wins
        (0.3, 2, 0.16, [0.005, 0.01, 0.02, 0.04, 0.08, 0.16]),  # still at the top after the cap: the cap holds
        (0.001, 2, 0.00125, [0.005, 0.01, 0.02, 0.04, 0.0025, 0.00125]),  # the bottom won: halved
        (0.3, 0, 0.04, [0.005, 0.01, 0.02, 0.04]),  # --widen 0: the grid alone
    ],
)
def test_a_pick_at_an_edge_of_the_grid_is_tried_beyond_it(script, best, widen, picked, tried):
    # Prepare: a score that peaks at `best` (log scale), and a record of the rates run
    ran = []

    def score(lr):
        ran.append(lr)
        return (-abs(math.log(lr / best)), 0.0)

    # Execute
    pick, scores = script.pick_rate(score, [0.005, 0.01, 0.02, 0.04], widen=widen)
    # Assert: the pick, and exactly the rates it took to find it
    assert pick == pytest.approx(picked)
    assert ran == pytest.approx(tried) and list(scores) == ran
