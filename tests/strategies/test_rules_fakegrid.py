"""FedSA-LoRA and RoLoRA over the in-process Grid: the real server loop and the real client steps.

docs/methods.md, invariant 9 (B never uploaded; a node's B is the B it trained, bit for bit across
rounds and across a resume) and 10 (one factor trains and travels per round, the other is
bit-identical on every client). The embedded model on a tiny cut of the embedded data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fedpeft.clients.app
from fedpeft.cli.configs import compose_config
from fedpeft.clients.state import NodeStore
from fedpeft.models import adapters as models
from fedpeft.protocol import wire as protocol
from fedpeft.server.loop import run_federated
from tests.fakegrid import InProcessGrid

SMALL = [
    "+exp=smoke",
    "num_clients=3",
    "clients_per_round=2",
    "data.max_samples=60",
    "model.max_length=32",
    "client.local_steps=2",
    "save_adapter=false",
    "eval_every=100",
]
B_SUFFIX, A_SUFFIX = ".lora_B.weight", ".lora_A.weight"


class Recorder:
    """Wraps the client's train step and reply encoder: what every job started from, trained and sent."""

    def __init__(self, monkeypatch) -> None:
        self.jobs: list[tuple[int, int, dict, dict]] = []  # (round, partition, start, after)
        self.uploads: list[tuple[int, int, set[str]]] = []
        train_jobs, encode = fedpeft.clients.app.train_jobs, fedpeft.clients.app.encode

        def recording_train_jobs(jobs):
            results = train_jobs(jobs)
            for job, result in zip(jobs, results):
                if job.plan.trains:  # evaluation jobs (a rule's evaluation round) only build and score a model
                    self.jobs.append((job.plan.server_round, job.partition_id, dict(job.start), dict(result.state)))
            return results

        def recording_encode(job, result):
            reply = encode(job, result)
            if protocol.ARRAYS_RECORD in reply.content.array_records:
                self.uploads.append(
                    (job.plan.server_round, job.partition_id, set(reply.content.array_records[protocol.ARRAYS_RECORD]))
                )
            return reply

        monkeypatch.setattr(fedpeft.clients.app, "train_jobs", recording_train_jobs)
        monkeypatch.setattr(fedpeft.clients.app, "encode", recording_encode)


class StopAtRound(InProcessGrid):
    """A grid whose server 'dies' when it sends the train messages of ``round``."""

    def __init__(self, *args, stop: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if (
                protocol.PLAN_RECORD in msg.content.config_records
                and msg.content.config_records[protocol.PLAN_RECORD][protocol.SERVER_ROUND] == self.stop
            ):
                raise KeyboardInterrupt(f"killed before round {self.stop}")
        return super().push_messages(messages)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    """A 2-layer, 32-wide random-init BERT with the embedded model's tokenizer, saved to disk."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedpeft.models.paths import resolve_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return [*SMALL, f"model.name_or_path={path}"]


def grid(cls=InProcessGrid, **kwargs):
    return cls(fedpeft.clients.app.app, [{protocol.NODE_PARTITION_ID: k} for k in range(3)], **kwargs)


def kept(run_dir: Path, partition: int) -> dict[str, torch.Tensor] | None:
    lineage = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["lineage"]
    return NodeStore(run_dir / "nodes" / f"node-{partition}").load_kept(lineage)


def test_fedsa_lora_keeps_each_b_on_its_node_bit_for_bit_across_rounds_and_a_resume(tmp_path, monkeypatch, tiny_model):
    # Prepare
    recorder = Recorder(monkeypatch)
    cfg = compose_config([*tiny_model, "strategy.name=fedsa_lora", "num_rounds=3", "seed=2"])
    # Execute: an uninterrupted run, and the same run killed before round 2 and resumed
    # (each run gets a fresh model cache, as its own process would: a second run in one process that
    # reuses the cached worker model does not train bit-identically since the protocol's milestone 2)
    models.clear_cache()
    rows = run_federated(cfg, grid(), tmp_path / "reference")
    reference_jobs = list(recorder.jobs)
    models.clear_cache()
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, grid(StopAtRound, stop=2), tmp_path / "killed")
    models.clear_cache()
    resumed_cfg = compose_config(
        [*tiny_model, "strategy.name=fedsa_lora", "num_rounds=3", "seed=2", f"resume={tmp_path / 'killed'}"]
    )
    run_federated(resumed_cfg, grid(), tmp_path / "killed")
    # Assert: no upload ever holds a B
    assert recorder.uploads and not any(k.endswith(B_SUFFIX) for _, _, keys in recorder.uploads for k in keys)
    # a node starts each round from the B it trained last (zero before its first round), bit for bit
    last: dict[int, dict] = defaultdict(dict)
    for server_round, partition, start, after in reference_jobs:
        b_keys = sorted(k for k in start if k.endswith(B_SUFFIX))
        for key in b_keys:
            expected = last[partition].get(key)
            assert (
                torch.equal(start[key], expected) if expected is not None else torch.count_nonzero(start[key]) == 0
            ), (server_round, partition, key)
        last[partition] = {k: after[k] for k in b_keys}
        assert any(not torch.equal(after[k], start[k]) for k in b_keys)  # B did train
    for partition, trained in last.items():  # what the node keeps on disk is that B
        stored = kept(tmp_path / "reference", partition)
        assert all(torch.equal(stored[k], v) for k, v in trained.items())
    # the resumed run ends with the same node state and the same metrics as the uninterrupted one
    for partition in range(3):
        a, b = kept(tmp_path / "reference", partition), kept(tmp_path / "killed", partition)
        assert (a is None) == (b is None) and (
            a is None or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
        )
    resumed = [
        r for r in __import__("fedpeft.reporting.metrics", fromlist=["read_metrics"]).read_metrics(tmp_path / "killed")
    ]
    same = ["round", "train_loss", "bytes_up", "bytes_down", "personal_accuracy"]
    assert [[r.get(k) for k in same] for r in resumed] == [[r.get(k) for k in same] for r in rows]
    assert all(r["personal_accuracy"] is not None for r in rows)


def test_rolora_alternates_the_trained_factor_and_keeps_the_frozen_one_identical_everywhere(
    tmp_path, monkeypatch, tiny_model
):
    # Prepare
    recorder = Recorder(monkeypatch)
    cfg = compose_config([*tiny_model, "strategy.name=rolora", "num_rounds=3", "clients_per_round=3"])
    # Execute
    rows = run_federated(cfg, grid(), tmp_path / "run")
    # Assert: odd rounds train and upload B, even rounds A; the frozen factor is the same on every client
    for server_round in (1, 2, 3):
        trained, frozen = (B_SUFFIX, A_SUFFIX) if server_round % 2 else (A_SUFFIX, B_SUFFIX)
        jobs = [(p, start, after) for r, p, start, after in recorder.jobs if r == server_round]
        assert len(jobs) == 3
        frozen_keys = sorted(k for k in jobs[0][1] if k.endswith(frozen))
        for _, start, after in jobs:
            assert all(torch.equal(after[k], start[k]) and torch.equal(start[k], jobs[0][1][k]) for k in frozen_keys)
            assert any(not torch.equal(after[k], start[k]) for k in start if k.endswith(trained))
        for r, _, keys in recorder.uploads:
            if r == server_round:
                assert any(k.endswith(trained) for k in keys) and not any(k.endswith(frozen) for k in keys)
    assert all(row["residual"] < 1e-6 for row in rows)


def nbytes(state: dict, suffixes: tuple[str, ...] | None = None, *, heads: bool) -> int:
    """Bytes of the LoRA tensors ending in ``suffixes`` (all LoRA when None) plus, if asked, the heads."""
    total = 0
    for key, tensor in state.items():
        lora = key.endswith((A_SUFFIX, B_SUFFIX))
        if (lora and (suffixes is None or key.endswith(suffixes))) or (not lora and heads):
            total += tensor.numel() * tensor.element_size()
    return total


# (rule, heterogeneous ranks?, bytes down, bytes up) as functions of (round, the client's adapter)
BYTES = {
    "fedex_lora": (False, None, lambda t, s: nbytes(s, heads=True)),
    "flexlora": (True, lambda t, s: nbytes(s, heads=True), lambda t, s: nbytes(s, heads=True)),
    "hetlora": (True, lambda t, s: nbytes(s, heads=True), lambda t, s: nbytes(s, heads=True)),
    "fedsa_lora": (
        True,
        lambda t, s: nbytes(s, (A_SUFFIX,), heads=True),
        lambda t, s: nbytes(s, (A_SUFFIX,), heads=False),
    ),
    "rolora": (
        True,
        lambda t, s: nbytes(s, heads=True),
        lambda t, s: nbytes(s, (B_SUFFIX if t % 2 else A_SUFFIX,), heads=True),
    ),
    "fedsvd": (
        True,
        lambda t, s: nbytes(s, (B_SUFFIX,) if t == 1 else None, heads=True),
        lambda t, s: nbytes(s, (B_SUFFIX,), heads=True),
    ),
}


@pytest.mark.parametrize("rule", sorted(BYTES))
def test_every_new_rule_runs_the_server_loop_with_exact_bytes(tmp_path, monkeypatch, tiny_model, rule):
    # Prepare
    recorder = Recorder(monkeypatch)
    hetero, down, up = BYTES[rule]
    ranks = ["strategy.ranks=[4,2,1]"] if hetero else []
    cfg = compose_config([*tiny_model, f"strategy.name={rule}", "num_rounds=3", "model.lora.r=4", *ranks])
    # Execute
    rows = run_federated(cfg, grid(), tmp_path / "run")
    # Assert: every round aggregated; bytes per client are exactly what the plan moves
    assert [r["clients_replied"] for r in rows] == [2, 2, 2] and not any(
        r["clients_rejected"] or r["clients_failed"] for r in rows
    )
    after = {(t, p): state for t, p, _, state in recorder.jobs}
    for row in rows:
        for client in row["clients"]:
            state = after[(row["round"], client["partition"])]
            assert client["rank"] == ([4, 2, 1][client["partition"]] if hetero else 4)
            assert client["bytes_up"] == up(row["round"], state), (rule, row["round"])
            if down is not None:
                assert client["bytes_down"] == down(row["round"], state), (rule, row["round"])
    if rule == "fedex_lora":  # the adapter plus the stacks of every round the node missed, (K+1) r wide
        assert rows[0]["bytes_down"] == 2 * nbytes(after[(1, rows[0]["clients"][0]["partition"])], heads=True)
        assert rows[2]["bytes_down"] > 2 * nbytes(after[(3, rows[2]["clients"][0]["partition"])], heads=True)


@pytest.mark.parametrize("rule", ["fedsvd", "rolora"])  # the new rules of the DP table (each run costs seconds)
def test_the_dp_rules_train_through_the_dp_client_path(tmp_path, tiny_model, rule):
    cfg = compose_config(
        [
            *tiny_model,
            f"strategy.name={rule}",
            "num_rounds=2",
            "client=dp",
            "client.dp.target_epsilon=null",
            "client.dp.noise_multiplier=1.0",
        ]
    )

    rows = run_federated(cfg, grid(), tmp_path / "run")

    assert [r["clients_replied"] for r in rows] == [2, 2]
    assert all(c["epsilon"] > 0 and c["noise_multiplier"] > 0 for r in rows for c in r["clients"])
    assert 0 < rows[0]["max_epsilon"] < rows[-1]["max_epsilon"] < float("inf")  # ε composes over rounds


@pytest.mark.parametrize("rule", sorted(BYTES))
def test_the_rule_and_its_hetero_experiment_compose(rule):
    cfg = compose_config([f"strategy={rule}"])
    assert cfg.strategy.name == rule and cfg.strategy.ranks is None
    if BYTES[rule][0]:  # takes heterogeneous ranks
        hetero = compose_config([f"+exp={rule}_hetero"])
        assert hetero.strategy.name == rule and hetero.strategy.ranks == [16, 8, 4, 4, 2, 2, 1, 1, 1, 1]
