"""model.autocast: the forward in bf16 under torch.autocast, everything that is kept or sent in float32."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedpeft.cli.configs import compose_config
from fedpeft.clients.app import app as client_app
from fedpeft.engines.batched import BatchedGrid
from fedpeft.models import adapters as models
from fedpeft.server.loop import run_federated
from fedpeft.training.local import AUTOCAST, forward_logits, train_local
from tests.fakegrid import InProcessGrid
from tests.test_engines import TINY, final_adapter, tiny_bert_dir  # noqa: F401  (tiny_bert_dir: a fixture)


def tiny_peft_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS
    )
    return get_peft_model(BertForSequenceClassification(config), lora)


def batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(1, 64, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 3, (8,), generator=g),
        }
        for _ in range(n)
    ]


def matmul_dtypes(model, batch) -> set[torch.dtype]:
    """The dtypes the base's feed-forward matmuls produce in one forward."""
    seen: set[torch.dtype] = set()
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for n, m in model.named_modules()
        if n.endswith("intermediate.dense")
    ]
    logits = forward_logits(model, batch)
    for h in handles:
        h.remove()
    assert logits.dtype == torch.float32  # the loss never sees bf16 logits
    return seen


def test_only_the_forward_is_autocast_and_what_trains_stays_float32():
    # Prepare: one model, with and without the attribute model.autocast sets
    model = tiny_peft_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Execute and assert: the base computes in bf16 only when asked
    assert matmul_dtypes(model, batches(1)[0]) == {torch.float32}
    setattr(model, AUTOCAST, torch.bfloat16)
    assert matmul_dtypes(model, batches(1)[0]) == {torch.bfloat16}
    mixed = train_local(model, batches(), num_steps=4, lr=1e-2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    # The same steps in float32 from the same start: close to the mixed-precision ones, not equal to them
    delattr(model, AUTOCAST)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    full = train_local(model, batches(), num_steps=4, lr=1e-2)
    moved = sum(float((model.get_parameter(n).detach() - start[n]).norm()) for n in start)
    apart = sum(float((model.get_parameter(n).detach() - trained[n]).norm()) for n in start)
    assert 0 < apart < 0.05 * moved, (apart, moved)
    assert mixed.loss == pytest.approx(full.loss, rel=2e-2)


def test_batched_pass_and_one_client_at_a_time_agree_under_autocast(tmp_path, tiny_bert_dir):  # noqa: F811
    # Prepare: the same run on both engines, in bf16 autocast and in float32
    common = [
        *TINY,
        "num_clients=3",
        "clients_per_round=3",
        f"model.name_or_path={tiny_bert_dir}",
        "strategy=fedavg",
        "strategy.ranks=[4,2,3]",
    ]
    runs = {}
    for name, extra in {
        "batched": ["model.autocast=bfloat16"],
        "single": ["model.autocast=bfloat16"],
        "float32": [],
    }.items():
        cfg = compose_config([*common, *extra])
        models.clear_cache()
        grid = (
            BatchedGrid(num_nodes=3, clients_per_pass=2, seed=cfg.seed)
            if name == "batched"
            else InProcessGrid(client_app, [{"partition-id": k} for k in range(3)])
        )
        runs[name] = (run_federated(cfg, grid, tmp_path / name), final_adapter(tmp_path / name))
    # Assert: the adapter on disk is float32; the engines agree to bf16's precision; autocast changed the run
    (rows_b, fb), (rows_s, fs), (_, ff) = runs["batched"], runs["single"], runs["float32"]
    assert {t.dtype for t in fb.values()} == {torch.float32}
    assert [[c["partition"] for c in r["clients"]] for r in rows_b] == [
        [c["partition"] for c in r["clients"]] for r in rows_s
    ]
    for a, b in zip(rows_b, rows_s):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
    engines = max(float((fb[k].double() - fs[k].double()).abs().max()) for k in fb)
    precision = max(float((fs[k].double() - ff[k].double()).abs().max()) for k in fs)
    assert 0 < precision and engines < 0.1 * precision, (engines, precision)  # measured: 3e-5 against 3e-3
