"""A local client step on a tiny random-init model: only LoRA factors and the head move."""

from __future__ import annotations

import pytest
import torch

from fedpeft.clients.job import start_state
from fedpeft.data.encoding import make_loader
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER, ClientPlan, GroupPlan, ProtocolError, Source, single_group
from fedpeft.training.local import train_local


def random_examples(n: int, *, num_labels: int = 3, vocab: int = 100, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, vocab, (length,), generator=g).tolist(),
            "attention_mask": [1] * length,
            "labels": int(torch.randint(0, num_labels, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def test_train_step_changes_only_lora_and_head(tiny_bert):
    # Prepare
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    for module in tiny_bert.modules():  # B starts at zero; make it non-zero so A gets gradients too
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    loader = make_loader(random_examples(16), pad_token_id=0, batch_size=8, shuffle=True, seed=0)
    # Execute
    result = train_local(tiny_bert, loader, num_steps=3, lr=1e-2)
    # Assert
    assert result.num_steps == 3 and result.num_examples == 24 and result.loss > 0
    changed = {n for n, p in tiny_bert.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    for name in changed:
        assert "lora_A" in name or "lora_B" in name or "modules_to_save" in name, name
    lora_and_head = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert changed == lora_and_head


def plan_of(*groups: GroupPlan, rank: int = 2) -> ClientPlan:
    return ClientPlan(groups=groups, server_round=1, rank=rank)


CURRENT = {
    "m.q.lora_A.weight": torch.full((2, 5), 99.0),  # stale values of whatever ran before on this worker
    "m.q.lora_B.weight": torch.full((4, 2), 99.0),
    "m.classifier.weight": torch.full((3, 4), 99.0),
}


def test_start_state_loads_received_seeds_a_and_zeroes_b():
    received = {"m.classifier.weight": torch.full((3, 4), 7.0)}
    plan = plan_of(
        GroupPlan(roles={LORA_A}, source=Source.SEED, seed=5, seed_rank=4),
        GroupPlan(roles={LORA_B}, source=Source.ZERO),
        GroupPlan(roles={OTHER}, source=Source.MESSAGE),
    )
    state = start_state(CURRENT, received, plan=plan, kept=None)
    assert torch.equal(state["m.classifier.weight"], received["m.classifier.weight"])
    assert torch.equal(state["m.q.lora_B.weight"], torch.zeros(4, 2))
    # independent oracle: peft-style Kaiming-uniform drawn at rank 4 from the seed, first 2 rows kept
    g = torch.Generator().manual_seed(5)
    bound = 1 / 5**0.5
    expected_a = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 * bound - bound)[:2].float()
    assert torch.equal(state["m.q.lora_A.weight"], expected_a)


def test_start_state_takes_the_nodes_own_state_or_its_fallback():
    plan = plan_of(
        GroupPlan(roles={LORA_A, OTHER}, source=Source.MESSAGE),
        GroupPlan(roles={LORA_B}, source=Source.NODE, fallback=Source.ZERO, keep=True),
    )
    received = {"m.q.lora_A.weight": torch.ones(2, 5), "m.classifier.weight": torch.ones(3, 4)}
    kept = {"m.q.lora_B.weight": torch.full((4, 2), 3.0)}
    assert torch.equal(
        start_state(CURRENT, received, plan=plan, kept=kept)["m.q.lora_B.weight"], kept["m.q.lora_B.weight"]
    )
    assert torch.count_nonzero(start_state(CURRENT, received, plan=plan, kept=None)["m.q.lora_B.weight"]) == 0


def test_start_state_refuses_to_invent_or_ignore_tensors():
    plan = plan_of(*single_group(source=Source.MESSAGE))
    with pytest.raises(ProtocolError, match="'m.q.lora_B.weight' from the message"):
        start_state(
            CURRENT,
            {"m.q.lora_A.weight": torch.ones(2, 5), "m.classifier.weight": torch.ones(3, 4)},
            plan=plan,
            kept=None,
        )
    with pytest.raises(ProtocolError, match="no message-sourced group"):
        start_state(CURRENT, {**CURRENT, "m.k.lora_A.weight": torch.ones(2, 5)}, plan=plan, kept=None)
    with pytest.raises(ProtocolError, match="shape"):
        start_state(CURRENT, {**CURRENT, "m.q.lora_A.weight": torch.ones(3, 5)}, plan=plan, kept=None)
