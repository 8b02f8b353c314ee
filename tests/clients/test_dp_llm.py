"""DP-SGD on instruction data: response-only per-sample loss, bf16 compute, checked against Opacus."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedpeft.clients.dp import LinearGradSampler, train_local_dp
from fedpeft.data.encoding import Collator
from fedpeft.training.local import per_sample_loss


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return peft_model


def instruction_examples(n: int, *, seed: int = 0):
    """Prompt tokens labelled −100, a response of 1–4 tokens labelled with its ids (lengths vary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(1, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(1, 64, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        out.append(
            {
                "input_ids": prompt + response,
                "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [-100] * len(prompt) + response,
            }
        )
    return out


def test_the_per_sample_loss_is_the_mean_over_each_samples_own_response_tokens():
    model = tiny_llama().double().eval()
    data = instruction_examples(4)
    losses = per_sample_loss(model, Collator(0)(data))
    for i, e in enumerate(data):
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        n_prompt = e["labels"].count(-100)
        # Independent: the response tokens' NLL, each predicted from the token before it.
        nll = [-torch.log_softmax(logits[t - 1], -1)[e["input_ids"][t]] for t in range(n_prompt, len(e["input_ids"]))]
        torch.testing.assert_close(losses[i], torch.stack(nll).mean(), rtol=1e-10, atol=1e-12)


def test_response_only_per_sample_gradients_equal_a_per_example_loop():
    model = tiny_llama().double().eval()
    data = instruction_examples(5)
    sampler = LinearGradSampler(model)
    per_sample_loss(model, Collator(0)(data)).sum().backward()
    samples = sampler.grad_samples()
    sampler.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, Collator(0)([data[i]])).sum().backward()
        for p, s in zip(params, samples):
            torch.testing.assert_close(s[i], p.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.bfloat16, 1e-5)])
def test_response_only_dp_update_equals_opacus(dtype, tol):
    """float64: exact. bfloat16 base (LoRA factors float32, clipping and noise float32): both paths agree."""
    base = tiny_llama(dtype)
    if dtype == torch.float64:
        base = base.double()
    base.eval()
    data = instruction_examples(24)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = dict(num_steps=3, batch_size=6, lr=1e-2, noise_multiplier=0.7, max_grad_norm=0.05, seed=11)
    train_local_dp(ours, data, Collator(0), mode="lora", **kwargs)
    train_local_dp(theirs, data, Collator(0), mode="opacus", **kwargs)
    moved = 0
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if p.requires_grad:
            assert p.dtype == torch.float32 or dtype == torch.float64, name  # the trained factors stay full precision
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)
        moved += int(not torch.equal(p, dict(base.named_parameters())[name]))
    assert moved > 0
