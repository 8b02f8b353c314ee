"""A local client step on a tiny random-init model: only LoRA factors and the head move."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord

from clients.app import starting_state
from fedpeft.data import make_loader
from fedpeft.records import LORA_A_SUFFIX, LORA_B_SUFFIX, resize_rank, seeded_lora_a
from fedpeft.training import train_local


def random_examples(n: int, *, num_labels: int = 3, vocab: int = 100, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(1, vocab, (length,), generator=g).tolist(), "attention_mask": [1] * length, "labels": int(torch.randint(0, num_labels, (1,), generator=g))}
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


def test_starting_state_loads_received_seeds_a_and_zeroes_fresh_b():
    current = {
        "m.q.lora_A.weight": torch.ones(2, 5),
        "m.q.lora_B.weight": torch.ones(4, 2),
        "m.classifier.weight": torch.ones(3, 4),
    }
    received = {"m.classifier.weight": torch.full((3, 4), 7.0)}
    instructions = ConfigRecord({"lora-init": "fresh", "a-seed": 5, "max-rank": 4})
    state = starting_state(current, received, instructions, rank=2)
    assert torch.equal(state["m.classifier.weight"], received["m.classifier.weight"])
    assert torch.equal(state["m.q.lora_B.weight"], torch.zeros(4, 2))
    expected_a = resize_rank(seeded_lora_a(resize_rank(current, 4), seed=5), 2)["m.q.lora_A.weight"]
    assert torch.equal(state["m.q.lora_A.weight"], expected_a)


def test_starting_state_refuses_to_invent_tensors():
    current = {"m.q.lora_A.weight": torch.ones(2, 5), "m.q.lora_B.weight": torch.ones(4, 2)}
    import pytest

    with pytest.raises(ValueError, match="no value for 'm.q.lora_B.weight'"):
        starting_state(current, {"m.q.lora_A.weight": torch.ones(2, 5)}, ConfigRecord({"lora-init": "load"}), rank=2)
    with pytest.raises(ValueError, match="does not have"):
        starting_state(current, {**current, "m.k.lora_A.weight": torch.ones(2, 5)}, ConfigRecord({}), rank=2)
    assert LORA_A_SUFFIX and LORA_B_SUFFIX
