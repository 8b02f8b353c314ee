"""docs/methods.md, invariant 12: K clients trained in one lockstep pass equal each client trained alone.

The oracle is the one-client path every engine already uses (`fedpeft.training.local.train_local` on the
peft model with the client's adapter active), run on a fresh loader with the same seed. Ranks,
scalings, batch sizes, step counts and frozen factors differ per client; sequences have different
lengths (so a pass pads client batches to a common width); every dropout is off.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedpeft.data.encoding import make_loader
from fedpeft.training.batched import BatchedError, ClientTask, train_batched
from fedpeft.training.local import train_local

VOCAB, PAD = 64, 0
BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_bert(dtype: torch.dtype):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    return BertForSequenceClassification(config).to(dtype), TaskType.SEQ_CLS, BERT_TARGETS, ["classifier"]


def tiny_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM(config).to(dtype), TaskType.CAUSAL_LM, LLAMA_TARGETS, []


@functools.cache
def peft_model(kind: str, dtype: torch.dtype, specs: tuple[tuple[int, float], ...]):
    """A peft model with one adapter per (rank, alpha) in ``specs``, named ``c0``, ``c1``, ..."""
    base, task_type, targets, heads = {"bert": tiny_bert, "llama": tiny_llama}[kind](dtype)
    model = None
    for i, (rank, alpha) in enumerate(specs):
        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=heads or None,
            task_type=task_type,
        )
        model = (
            get_peft_model(base, cfg, adapter_name=f"c{i}")
            if model is None
            else (model.add_adapter(f"c{i}", cfg) or model)
        )
    return model


def examples(n: int, *, seed: int, lm: bool):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": ids if lm else int(torch.randint(0, 3, (1,), generator=g)),
            }
        )
    return out


def random_state(model, name: str, *, seed: int) -> dict[str, torch.Tensor]:
    """Both LoRA factors and the head random (peft's B = 0 would make A's gradient vanish)."""
    g = torch.Generator().manual_seed(seed)
    sd = get_peft_model_state_dict(model, adapter_name=name)
    return {
        k: (0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype) for k, v in sorted(sd.items())
    }


def train_alone(
    model,
    name: str,
    start: dict,
    data: list,
    *,
    batch_size: int,
    seed: int,
    steps: int,
    lr: float,
    wd: float,
    frozen: frozenset,
):
    """The oracle: the one-client path on the shared model (what a Ray worker runs)."""
    set_peft_model_state_dict(model, start, adapter_name=name)
    model.set_adapter(name)
    for pname, p in model.named_parameters():
        key = pname.replace(f".{name}.", ".").replace(".modules_to_save.", ".")
        if f".{name}." in pname and key in frozen:
            p.requires_grad_(False)
    result = train_local(
        model,
        make_loader(data, pad_token_id=PAD, batch_size=batch_size, shuffle=True, seed=seed),
        num_steps=steps,
        lr=lr,
        weight_decay=wd,
    )
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    return result, state


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1e-30))


def check_pass(
    kind: str,
    dtype: torch.dtype,
    *,
    ranks,
    alphas,
    batch_sizes,
    steps,
    frozen_a,
    tol: float,
    wd: float = 0.05,
    lr: float = 0.02,
):
    # Prepare
    specs = tuple(zip(ranks, alphas))
    model = peft_model(kind, dtype, specs)
    lm = kind == "llama"
    names = [f"c{i}" for i in range(len(specs))]
    starts = [random_state(model, n, seed=10 + i) for i, n in enumerate(names)]
    data = [examples(7 + 3 * i, seed=100 + i, lm=lm) for i in range(len(names))]
    seeds = [
        (1_000_003 + 7) * 1_009 + i for i in range(len(names))
    ]  # the ClientApp's shuffle-seed formula, seed 0 round 7
    frozen = [
        frozenset(k for k in s if k.endswith(".lora_A.weight")) if fa else frozenset()
        for s, fa in zip(starts, frozen_a)
    ]
    tasks = [
        ClientTask(
            adapter_name=n,
            adapter=s,
            batches=make_loader(d, pad_token_id=PAD, batch_size=b, shuffle=True, seed=sd),
            num_steps=k,
            lr=lr,
            weight_decay=wd,
            frozen=f,
        )
        for n, s, d, b, sd, k, f in zip(names, starts, data, batch_sizes, seeds, steps, frozen)
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    outcomes = train_batched(model, tasks, pad_token_id=PAD)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the pass changed the shared model"
    alone = [
        train_alone(model, n, s, d, batch_size=b, seed=sd, steps=k, lr=lr, wd=wd, frozen=f)
        for n, s, d, b, sd, k, f in zip(names, starts, data, batch_sizes, seeds, steps, frozen)
    ]
    # Assert
    worst = 0.0
    for i, (outcome, (result, state)) in enumerate(zip(outcomes, alone)):
        assert set(outcome.adapter) == set(state)
        assert (outcome.result.num_steps, outcome.result.num_examples) == (result.num_steps, result.num_examples)
        assert abs(outcome.result.loss - result.loss) <= tol * max(abs(result.loss), 1.0), (
            i,
            outcome.result.loss,
            result.loss,
        )
        for key in state:
            err = rel_err(outcome.adapter[key], state[key])
            worst = max(worst, err)
            assert err <= tol, (
                f"client {i} ({names[i]}, rank {ranks[i]}, {steps[i]} steps) {key}: relative error {err:.2e} > {tol:.0e}"
            )
            if key in frozen[i]:
                assert torch.equal(outcome.adapter[key], starts[i][key].to(outcome.adapter[key].dtype))
        assert any(not torch.equal(outcome.adapter[k], starts[i][k]) for k in state) or steps[i] == 0
    return worst


def test_bert_float64_different_ranks_steps_batches_and_a_frozen_client():
    worst = check_pass(
        "bert",
        torch.float64,
        ranks=(2, 4, 3),
        alphas=(4.0, 8.0, 9.0),
        batch_sizes=(3, 2, 4),
        steps=(2, 5, 3),
        frozen_a=(False, False, True),
        tol=1e-10,
    )
    print(f"worst relative error {worst:.2e}")


def test_llama_float64_all_linear_layers():
    check_pass(
        "llama",
        torch.float64,
        ranks=(4, 1, 2),
        alphas=(8.0, 2.0, 6.0),
        batch_sizes=(2, 3, 2),
        steps=(3, 1, 4),
        frozen_a=(False, True, False),
        tol=1e-10,
    )


def test_bert_float32_relative_1e5():
    check_pass(
        "bert",
        torch.float32,
        ranks=(4, 2),
        alphas=(8.0, 4.0),
        batch_sizes=(4, 2),
        steps=(4, 2),
        frozen_a=(False, False),
        tol=1e-5,
    )


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    clients=st.lists(
        st.tuples(
            st.integers(1, 5), st.sampled_from([1.0, 2.0, 0.5]), st.integers(1, 4), st.integers(0, 4), st.booleans()
        ),
        min_size=1,
        max_size=4,
    )
)
def test_property_any_mix_of_ranks_steps_and_batches(clients):
    ranks = tuple(c[0] for c in clients)
    check_pass(
        "bert",
        torch.float64,
        ranks=ranks,
        alphas=tuple(c[0] * c[1] for c in clients),
        batch_sizes=tuple(c[2] for c in clients),
        steps=tuple(c[3] for c in clients),
        frozen_a=tuple(c[4] for c in clients),
        tol=1e-10,
    )


def test_oracle_sees_a_client_that_keeps_moving():
    """The comparison can fail: one step too many for client 0 (a finished client not frozen) is caught."""
    model = peft_model("bert", torch.float64, ((2, 4.0), (3, 6.0)))
    start = random_state(model, "c0", seed=1)
    data = examples(8, seed=3, lm=False)
    task = ClientTask(
        adapter_name="c0",
        adapter=start,
        batches=make_loader(data, pad_token_id=PAD, batch_size=2, shuffle=True, seed=5),
        num_steps=3,
        lr=0.02,
        weight_decay=0.05,
    )
    other = ClientTask(
        adapter_name="c1",
        adapter=random_state(model, "c1", seed=2),
        batches=make_loader(data, pad_token_id=PAD, batch_size=3, shuffle=True, seed=6),
        num_steps=5,
        lr=0.02,
    )
    outcome = train_batched(model, [task, other], pad_token_id=PAD)[0]
    _, two_steps = train_alone(
        model, "c0", start, data, batch_size=2, seed=5, steps=2, lr=0.02, wd=0.05, frozen=frozenset()
    )
    assert max(rel_err(outcome.adapter[k], two_steps[k]) for k in two_steps) > 1e-4


def test_refuses_what_it_cannot_route():
    model = peft_model("bert", torch.float64, ((2, 4.0),))
    start = random_state(model, "c0", seed=1)
    batches = make_loader(examples(4, seed=0, lm=False), pad_token_id=PAD, batch_size=2, shuffle=False)
    with pytest.raises(BatchedError, match="has no LoRA layer"):
        train_batched(
            model,
            [
                ClientTask(
                    adapter_name="c0",
                    adapter={**start, "base_model.model.bert.pooler.dense.lora_A.weight": torch.zeros(2, 16)},
                    batches=batches,
                    num_steps=1,
                    lr=0.1,
                )
            ],
            pad_token_id=PAD,
        )
    bad = {k: (v[:1] if k.endswith("lora_A.weight") else v) for k, v in start.items()}
    with pytest.raises(BatchedError, match="shape"):
        train_batched(
            model, [ClientTask(adapter_name="c0", adapter=bad, batches=batches, num_steps=1, lr=0.1)], pad_token_id=PAD
        )
    with pytest.raises(BatchedError, match="num_steps"):
        train_batched(
            model,
            [ClientTask(adapter_name="c0", adapter=start, batches=batches, num_steps=-1, lr=0.1)],
            pad_token_id=PAD,
        )


def test_lora_dropout_is_each_clients_own():
    """LoRA dropout is honoured per client: a client without dropout still equals its solo run
    when it shares the pass with a client whose adapter drops out half its inputs."""
    base, task_type, targets, heads = tiny_bert(torch.float64)
    model = get_peft_model(
        base,
        LoraConfig(
            r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, modules_to_save=heads, task_type=task_type
        ),
        adapter_name="c0",
    )
    model.add_adapter(
        "c1",
        LoraConfig(
            r=3, lora_alpha=6, lora_dropout=0.5, target_modules=targets, modules_to_save=heads, task_type=task_type
        ),
    )
    starts = [random_state(model, n, seed=i) for i, n in enumerate(["c0", "c1"])]
    data = [examples(8, seed=20 + i, lm=False) for i in range(2)]

    def tasks(dropping: bool):
        names = ["c0", "c1"] if dropping else ["c0"]
        return [
            ClientTask(
                adapter_name=n,
                adapter=starts[i],
                batches=make_loader(data[i], pad_token_id=PAD, batch_size=2, shuffle=True, seed=i),
                num_steps=3,
                lr=0.02,
            )
            for i, n in enumerate(names)
        ]

    torch.manual_seed(0)
    shared = train_batched(model, tasks(True), pad_token_id=PAD)
    torch.manual_seed(1)
    again = train_batched(model, tasks(True), pad_token_id=PAD)
    _, alone = train_alone(
        model, "c0", starts[0], data[0], batch_size=2, seed=0, steps=3, lr=0.02, wd=0.0, frozen=frozenset()
    )
    assert max(rel_err(shared[0].adapter[k], alone[k]) for k in alone) <= 1e-10
    # the dropping client's masks come from the global RNG: another seed, another adapter
    assert max(rel_err(shared[1].adapter[k], again[1].adapter[k]) for k in shared[1].adapter) > 1e-6
