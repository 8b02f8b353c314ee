"""FLoRA end to end on a tiny model: every worker's merged base equals W_0 + Σ ΔW_t, bit for bit.

The real strategy code builds the messages (with the stacks each node missed) and aggregates mock
replies from clients with random, non-zero factors of different ranks, under partial
participation; the real client code (``fedpeft.clients.job.sync_base``) merges them into worker models
that see the nodes in a shuffled order, as Ray workers do.
"""

from __future__ import annotations

import random

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.clients.job import store_base_updates, sync_base
from fedpeft.clients.state import NodeStore
from fedpeft.models.adapters import CachedModel
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import from_record, resize_rank, stack_to_delta, to_record
from fedpeft.strategies.flora import FLoRA
from fedpeft.strategies.types import NodeInfo

RANKS = [4, 2, 1, 3]


def tiny_cached_model() -> CachedModel:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from fedpeft.config.schema import LoraSettings, ModelConfig

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, num_labels=3
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS
    )
    model = get_peft_model(BertForSequenceClassification(config), lora, adapter_name="r4")
    settings = ModelConfig(name_or_path="tiny", lora=LoraSettings(r=4, alpha=8, target_modules=["query", "value"]))
    return CachedModel(model=model, cfg=settings, device=torch.device("cpu"))


def reply_for(msg: Message, node: NodeInfo, *, seed: int) -> Message:
    """A client's reply: random non-zero A and B at its rank (B = 0 would make the test trivial)."""
    g = torch.Generator().manual_seed(seed)
    received = from_record(msg.content["arrays"])
    template = resize_rank(FLORA_TEMPLATE, node.rank)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in template.items()}
    state.update({k: v + 0.01 for k, v in received.items()})  # the head trained a little
    metrics = MetricRecord({"num-examples": node.num_examples, "rank": node.rank, "train-loss": 1.0})
    return Message(RecordDict({"arrays": to_record(state), "metrics": metrics}), reply_to=msg)


FLORA_TEMPLATE: dict[str, torch.Tensor] = {}


def test_flora_workers_hold_w0_plus_accumulated_updates_under_partial_participation(tmp_path):
    # Prepare
    server_cm = tiny_cached_model()
    server_cm.activate(4)
    initial = server_cm.adapter_state(4)
    FLORA_TEMPLATE.update(initial)
    w0 = {name: layer.weight.detach().clone() for name, layer in server_cm.base_layers().items()}
    strategy = FLoRA(initial, clients_per_round=2, seed=1, scaling=2.0)
    strategy.lineage = "run-a"
    nodes = [NodeInfo(node_id=100 + k, partition_id=k, rank=r, num_examples=10 + 7 * k) for k, r in enumerate(RANKS)]
    strategy.register_nodes(nodes)
    workers = [tiny_cached_model(), tiny_cached_model()]
    stores = {n.node_id: NodeStore(tmp_path / f"node-{n.partition_id}") for n in nodes}
    shuffler = random.Random(0)
    config = ConfigRecord({})

    # Execute: 4 rounds; each sampled node lands on a random worker and syncs its base first
    for server_round in range(1, 5):
        messages = list(strategy.configure_train(server_round, ArrayRecord(), config, grid=None))
        replies = []
        for msg in messages:
            node = strategy.nodes[msg.metadata.dst_node_id]
            worker = shuffler.choice(workers)
            plan = protocol.decode_instruction(msg.content).plan
            store_base_updates(stores[node.node_id], plan)
            sync_base(worker, stores[node.node_id], plan)
            assert worker.base_version == server_round - 1
            for name, layer in worker.base_layers().items():  # every worker on the same base, bit for bit
                assert torch.equal(layer.weight, _expected(w0, strategy.base_updates)[name]), name
            replies.append(reply_for(msg, node, seed=server_round * 10 + node.partition_id))
        strategy.aggregate_train(server_round, replies)

    # Assert: the server's base, the stacks' rank, the residual and the downlink of a node that skipped rounds
    global_model = strategy.global_model()
    deltas = [stack_to_delta(u) for u in global_model.base_updates]
    server_cm.use_base("run-a", deltas, version=len(deltas))
    expected = _expected(w0, strategy.base_updates)
    for name, layer in server_cm.base_layers().items():
        assert torch.equal(layer.weight, expected[name])
        reference = w0[name].double() + sum(d[name] for d in deltas)
        torch.testing.assert_close(layer.weight.double(), reference, rtol=0, atol=1e-6)
    for report in strategy.reports.values():
        assert report.extra["residual"] < 1e-6
        assert report.extra["stack_rank"] == sum(strategy.nodes[c["node"]].rank for c in report.clients)
    # Outputs: the merged base with B = 0 adapters equals a plain model holding W_0 + Σ ΔW
    x = torch.randint(0, 50, (2, 7))
    server_cm.activate(4)
    server_cm.load_adapter_state(4, global_model.adapter)
    merged_out = server_cm.model.eval()(input_ids=x).logits
    plain = tiny_cached_model()
    plain.activate(4)
    plain.load_adapter_state(4, global_model.adapter)
    with torch.no_grad():
        for name, layer in plain.base_layers().items():
            layer.weight.copy_(expected[name])
    torch.testing.assert_close(plain.model.eval()(input_ids=x).logits, merged_out, rtol=0, atol=0)


def test_flora_restarts_lora_and_sends_missed_stacks_only():
    cm = tiny_cached_model()
    cm.activate(4)
    strategy = FLoRA(cm.adapter_state(4), clients_per_round=1, seed=0, scaling=2.0)
    nodes = [
        NodeInfo(node_id=1, partition_id=0, rank=4, num_examples=5),
        NodeInfo(node_id=2, partition_id=1, rank=2, num_examples=5),
    ]
    strategy.register_nodes(nodes)
    FLORA_TEMPLATE.update(cm.adapter_state(4))
    for server_round in (1, 2, 3):
        msgs = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid=None))
        msg = msgs[0]
        node = strategy.nodes[msg.metadata.dst_node_id]
        plan = protocol.decode_instruction(msg.content).plan
        assert sorted(plan.base.updates) == list(
            range(strategy.synced.get(node.partition_id, 0) + 1, len(strategy.base_updates) + 1)
        )
        assert all(
            not k.endswith(("lora_A.weight", "lora_B.weight")) for k in msg.content["arrays"]
        )  # fresh LoRA: A from a seed, B = 0
        assert (
            plan.group_of("m.lora_A.weight").source == protocol.Source.SEED
            and plan.group_of("m.lora_B.weight").source == protocol.Source.ZERO
        )
        strategy.aggregate_train(server_round, [reply_for(msg, node, seed=server_round)])
        assert all(torch.count_nonzero(v) == 0 for k, v in strategy.adapter.items() if k.endswith("lora_B.weight"))


def _expected(w0: dict[str, torch.Tensor], updates: list) -> dict[str, torch.Tensor]:
    """W_0 with every update merged in round order: float64 add, one cast per round."""
    weights = {k: v.clone() for k, v in w0.items()}
    for update in updates:
        for name, delta in stack_to_delta(update).items():
            weights[name] = (weights[name].double() + delta).to(weights[name].dtype)
    return weights
