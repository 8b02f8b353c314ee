"""``python -m fedpeft.report``: grouping by the differing overrides, mean ± std over seeds, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedpeft.report import ReportError, cli, find_runs, group_runs, load_runs, report


def fake_run(
    path: Path, *, overrides: list[str] | None, accs: list[float | None], config: dict | None = None, mb: float = 1.0
) -> Path:
    """A run directory as fedpeft writes it: metrics.jsonl (+ .hydra/overrides.yaml, config.yaml)."""
    path.mkdir(parents=True)
    rows = []
    for i, acc in enumerate(accs, start=1):
        rows.append({
            "round": i, "test_accuracy": acc, "test_loss": None if acc is None else 1 - acc, "train_loss": 0.5,
            "cumulative_bytes_up": int(i * mb * 1e6), "cumulative_bytes_down": int(2 * i * mb * 1e6), "wall_seconds": 2.0,
        })  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def multirun(tmp_path):
    """``-m strategy=fedavg,flora seed=0,1,2`` as Hydra lays it out; one flora seed never evaluated its last round."""
    root = tmp_path / "multirun"
    finals = {"fedavg": [0.70, 0.80, 0.75], "flora": [0.90, 0.60, 0.84]}
    for s, rule in enumerate(["fedavg", "flora"]):
        for seed in range(3):
            accs = [0.3, finals[rule][seed]] if (rule, seed) != ("flora", 1) else [0.3, 0.6, None]
            fake_run(
                root / f"{3 * s + seed}-{rule}-seed{seed}",
                overrides=[f"strategy={rule}", f"seed={seed}", "num_rounds=2"],
                accs=accs,
                mb=1 + s,
            )
    return root, finals


def test_runs_are_grouped_by_the_overrides_that_differ_and_averaged_over_seeds(multirun, tmp_path):
    root, finals = multirun
    # Execute
    text = report([root], tmp_path / "out")
    # Assert: one row per rule; mean and sample std over the three seeds, computed here with numpy
    runs = load_runs(find_runs([root]))
    columns, groups = group_runs(runs)
    assert columns == ["strategy"] and [g.key for g in groups] == [("fedavg",), ("flora",)]
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    for row, rule in zip(rows, ["fedavg", "flora"]):
        assert row["strategy"] == rule and row["runs"] == "3" and row["seeds"] == "0 1 2"
        assert float(row["final_accuracy_mean"]) == pytest.approx(np.mean(finals[rule]))
        assert float(row["final_accuracy_std"]) == pytest.approx(np.std(finals[rule], ddof=1))
        assert float(row["best_accuracy_mean"]) == pytest.approx(
            np.mean(finals[rule])
        )  # the last round is the best one here
    assert float(rows[1]["mb_up"]) == pytest.approx(
        (2 * 2 + 2 * 2 + 3 * 2) / 3
    )  # 2 MB a round; flora seed 1 ran 3 rounds
    assert (
        f"| fedavg | 3 | {100 * np.mean(finals['fedavg']):.1f} ± {100 * np.std(finals['fedavg'], ddof=1):.1f} |" in text
    )
    assert (tmp_path / "out" / "report.md").read_text().count("multirun/") == 6
    for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_overrides_the_resolved_configs_are_compared(tmp_path):
    base = {"seed": 0, "num_rounds": 2, "strategy": {"name": "fedavg", "ranks": None}, "data": {"dirichlet_alpha": 0.5}}
    a = fake_run(tmp_path / "a", overrides=None, accs=[0.5, 0.6], config=base)
    b = fake_run(tmp_path / "b", overrides=None, accs=[0.5, 0.7], config={**base, "seed": 1})
    c = fake_run(tmp_path / "c", overrides=None, accs=[0.5, 0.9], config={**base, "data": {"dirichlet_alpha": 100.0}})
    columns, groups = group_runs(load_runs(find_runs([a, b, c])))
    assert columns == ["data.dirichlet_alpha"]
    assert [(g.key, len(g.runs)) for g in groups] == [(("0.5",), 2), (("100.0",), 1)]


def test_a_missing_override_is_a_value_of_its_own(tmp_path):
    a = fake_run(tmp_path / "a", overrides=["seed=0"], accs=[0.5])
    b = fake_run(tmp_path / "b", overrides=["seed=0", "+exp=flora_hetero"], accs=[0.6])
    columns, groups = group_runs(load_runs(find_runs([a, b])))
    assert columns == ["exp"] and [g.key for g in groups] == [("(default)",), ("flora_hetero",)]


def test_the_command_refuses_paths_without_runs_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(ReportError, match="no such file"):
        find_runs([tmp_path / "nope"])


def test_the_command_prints_the_table_and_writes_next_to_a_multirun(multirun, capsys):
    root, _ = multirun
    assert cli([str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| strategy | seeds | final acc (%)") and (root / "report" / "report.csv").exists()
    assert cli([str(root)]) == 0  # the report folder of a previous call is not taken for a run


def test_a_group_is_labelled_by_its_settings(multirun):
    root, _ = multirun
    _, groups = group_runs(load_runs(find_runs([root])))
    assert [g.label for g in groups] == ["strategy=fedavg", "strategy=flora"]


def test_rounds_to_a_fraction_of_the_reference_and_traffic_per_client(tmp_path, capsys):
    ref = fake_run(
        tmp_path / "ref", overrides=None, accs=[0.5, 1.0], config={"seed": 0, "mode": "centralized", "num_clients": 4}
    )
    for seed, accs in enumerate([[0.5, 0.88, 0.95], [0.6, 0.96, 0.95]]):  # mean curve 0.55, 0.92, 0.95
        fake_run(
            tmp_path / "runs" / f"s{seed}", overrides=None, accs=accs, config={"seed": seed, "num_clients": 4}, mb=2.0
        )
    assert cli([str(tmp_path / "runs"), "--reference", str(ref), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    head, _, row = out.splitlines()[:3]
    assert "MB up / client" in head and head.endswith("| rounds to 90 % of reference (100.0 %) |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-1] == "2"  # 0.92 >= 0.9 x 1.0 at round 2 (the mean curve, not either seed alone)
    assert cells[5] == f"{3 * 2.0 / 4:.2f}"  # 6 MB over 3 rounds, 4 clients
    assert (
        cli([str(tmp_path / "runs"), "--reference", str(ref), "--fraction", "0.96", "--out", str(tmp_path / "out")])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[2].rstrip().endswith("| — |")  # never reached


def test_a_run_without_a_global_model_is_judged_by_its_clients_own_models(tmp_path):
    run = fake_run(
        tmp_path / "personal", overrides=None, accs=[None, None], config={"seed": 0, "strategy": {"name": "fedsa_lora"}}
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row, acc in zip(rows, (0.4, 0.7)):
        row["client_val_accuracy_mean"] = acc
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report([run], tmp_path / "out")
    assert "| 70.0 † | 70.0 † |" in text and "client_val_accuracy_mean" in text
    (loaded,) = load_runs(find_runs([run]))
    assert loaded.accuracy_key == "client_val_accuracy_mean" and loaded.best_accuracy == 0.7


def test_audited_runs_add_the_audit_figures_over_seeds(tmp_path):
    # Prepare: two audited seeds of one setting, one unaudited setting
    for seed, (auc, calibrated, exposure) in enumerate([(0.6, 0.55, 8.0), (0.7, 0.65, 9.0)]):
        run = fake_run(
            tmp_path / f"dp-off-{seed}", overrides=["client.dp.enabled=false", f"seed={seed}"], accs=[0.5, 0.6]
        )
        audit = {
            "membership": {"overall": {"auc": auc, "calibrated_auc": calibrated}},
            "canaries": {"mean_exposure": exposure},
        }
        (run / "audit.json").write_text(json.dumps(audit))
    fake_run(tmp_path / "dp-on-0", overrides=["client.dp.enabled=true", "seed=0"], accs=[0.3, 0.4])
    # Execute
    text = report([tmp_path], tmp_path / "out")
    # Assert: mean ± sample std of each figure; the unaudited group has none
    head, _, audited, plain = text.splitlines()[:4]
    assert head.endswith("| membership AUC | calibrated AUC | canary exposure (bits) |")
    assert audited.endswith("| 0.650 ± 0.071 | 0.600 ± 0.071 | 8.50 ± 0.71 |") and "false" in audited
    assert plain.endswith("| — | — | — |")
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert float(rows[0]["exposure_mean"]) == pytest.approx(8.5) and rows[1]["exposure_mean"] == ""
    (tmp_path / "dp-on-0" / "audit.json").write_text("{not json")
    with pytest.raises(ReportError, match="audit.json: not JSON"):
        report([tmp_path], tmp_path / "out")
