"""Merging a base update uses peft's layer semantics: outputs with the adapter active equal outputs
after merging its stack into the base and resetting B to zero (GPT-2 ``Conv1D``, i.e.
``fan_in_fan_out``, on ``c_proj`` and ``c_attn``; a Llama shape). The oracle is peft's own forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedpeft.config.schema import ModelConfig
from fedpeft.models.adapters import CachedModel, merge_delta
from fedpeft.protocol.records import split_state, stack_to_delta

RANK = 3


def tiny(kind: str, targets: list[str]) -> CachedModel:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        base = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
            )
        )
    else:
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
        base = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=targets, fan_in_fan_out=kind == "gpt2", task_type=TaskType.CAUSAL_LM
    )
    model = get_peft_model(base, lora, adapter_name="r3").eval()
    return CachedModel(model=model, cfg=ModelConfig(name_or_path="tiny", task="causal_lm"), device=torch.device("cpu"))


def randomise(cm: CachedModel) -> dict[str, torch.Tensor]:
    """Both factors random and non-zero (a fresh adapter's B = 0 would make the test pass trivially)."""
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in cm.adapter_state(RANK).items()}
    cm.load_adapter_state(RANK, state)
    return state


CASES = [
    ("gpt2", ["c_proj"]),
    ("gpt2", ["c_attn"]),
    ("gpt2", ["c_attn", "c_proj"]),
    ("llama", ["q_proj", "k_proj", "o_proj", "down_proj"]),
]


@pytest.mark.parametrize(("kind", "targets"), CASES)
def test_merging_the_stack_and_zeroing_b_keeps_the_outputs(kind, targets):
    # Prepare
    cm = tiny(kind, targets)
    state = randomise(cm)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = cm.model(input_ids=x).logits
        with cm.model.disable_adapter():
            plain = cm.model(input_ids=x).logits
    assert (before - plain).abs().max() > 1e-2  # the adapter matters, so the check below has teeth
    scaling = 2.0  # lora_alpha / r
    pairs, _ = split_state(state)
    stack = {}
    for pair in pairs:  # as a rule stacks it: the scaling folded into A
        stack[pair.a_key], stack[pair.b_key] = scaling * state[pair.a_key], state[pair.b_key]
    # Execute
    cm.use_base("run", [stack_to_delta(stack)], version=1)
    cm.load_adapter_state(
        RANK, {k: torch.zeros_like(v) if k.endswith(".lora_B.weight") else v for k, v in state.items()}
    )
    with torch.no_grad():
        after = cm.model(input_ids=x).logits
    # Assert
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_ignoring_fan_in_fan_out_would_be_caught():
    """The broken variant (ΔW added untransposed to GPT-2's square c_proj) changes the outputs."""
    cm = tiny("gpt2", ["c_proj"])
    state = randomise(cm)
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = cm.model(input_ids=x).logits
    deltas = stack_to_delta({k: 2.0 * v if k.endswith(".lora_A.weight") else v for k, v in state.items()})
    with torch.no_grad():
        for name, module in cm.lora_layers().items():
            module.fan_in_fan_out = False  # pretend the layer were an nn.Linear
            if tuple(module.get_base_layer().weight.shape) == tuple(deltas[name].shape):
                merge_delta(module, deltas[name])
            module.fan_in_fan_out = True
    cm.load_adapter_state(
        RANK, {k: torch.zeros_like(v) if k.endswith(".lora_B.weight") else v for k, v in state.items()}
    )
    with torch.no_grad():
        after = cm.model(input_ids=x).logits
    assert (after - before).abs().max() > 1e-3
