"""Privacy audit: exact AUC, exposure, canaries, and attacks that see memorisation when it is there."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.audit import (
    auc,
    average_ranks,
    example_losses,
    exposure,
    make_canaries,
    membership_report,
    plant_canaries,
    sequence_nll,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train ~30x faster on one thread than on two on a busy 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------------------ AUC
def test_auc_of_a_hand_worked_example():
    # members' losses 1, 2, 3; held-out 2, 4. Pairs (member, held-out) the attack orders right
    # (member loss lower): (1,2) (1,4) (2,4) (3,4) = 4, one tie (2,2) = 1/2, one wrong (3,2).
    # AUC = 4.5 / 6 = 0.75.
    members, held_out = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0])
    assert auc(-members, -held_out) == 0.75
    assert auc(-held_out, -members) == 0.25


def test_auc_extremes_and_errors():
    assert auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auc([0.0], [1.0, 2.0]) == 0.0
    assert auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        auc([float("nan")], [1.0])


scores = st.lists(st.integers(-5, 5).map(float) | st.floats(-10, 10), min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(pos=scores, neg=scores)
def test_auc_equals_the_pair_count(pos, neg):
    """Mann-Whitney through ranks equals counting every pair (ties count one half)."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert auc(pos, neg) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert auc(pos, neg) + auc(neg, pos) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(values=scores)
def test_average_ranks_match_their_definition(values):
    v = np.array(values)
    expected = [1 + np.sum(v < x) + (np.sum(v == x) - 1) / 2 for x in v]
    assert average_ranks(v).tolist() == pytest.approx(expected)


# ------------------------------------------------------------------------------ exposure
def test_exposure_on_a_constructed_ranking():
    candidates = [1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0]  # M = 7, log2(M + 1) = 3 bits
    assert exposure(5.0, candidates) == (1.0, 4)  # three candidates more likely: rank 4, 3 - 2 = 1 bit
    assert exposure(0.5, candidates) == (3.0, 1)  # the most likely: all 3 bits
    assert exposure(10.0, candidates) == (0.0, 8)  # the least likely: nothing exposed
    assert exposure(3.0, candidates) == (1.0, 4)  # a tie counts against the canary
    assert exposure(1.5, candidates)[0] == pytest.approx(3 - math.log2(2))


def test_canaries_are_seeded_distinct_and_of_one_format():
    a = make_canaries(count=3, candidates=50, digits=4, seed=7)
    assert a == make_canaries(count=3, candidates=50, digits=4, seed=7)
    assert a != make_canaries(count=3, candidates=50, digits=4, seed=8)
    every = a.secrets + a.candidates
    assert len(set(every)) == 53 and all(
        len(s.split()) == 4 and all(len(d) == 1 and d.isdigit() for d in s.split()) for s in every
    )
    assert a.text(a.secrets[0]) == f"my secret number is {a.secrets[0]}"
    with pytest.raises(ValueError, match="too many"):
        make_canaries(count=1, candidates=60, digits=2, seed=0)


def test_plant_canaries_appends_each_secret_repeats_times():
    from datasets import ClassLabel, Dataset

    train = Dataset.from_dict({"text": ["a", "b"], "label": [0, 0]}).cast_column("label", ClassLabel(names=["text"]))
    canaries = make_canaries(count=2, candidates=5, digits=3, seed=0)
    planted = plant_canaries(train, canaries, repeats=3)
    texts = list(planted["text"])
    assert texts[:2] == ["a", "b"] and len(texts) == 8
    assert all(texts.count(canaries.text(s)) == 3 for s in canaries.secrets)


def test_on_instruction_data_a_canary_is_an_instruction_whose_response_is_the_secret():
    """Planted in the normalised layout, rendered by the run's template, scored on the response alone."""
    from fedpeft.cli.configs import compose_config
    from fedpeft.data import instruct
    from fedpeft.data.partition import build
    from fedpeft.models.adapters import load_tokenizer
    from fedpeft.privacy.audit import canary_examples

    cfg = compose_config(["+exp=llm_tiny", "model.max_length=64"])
    data = build(cfg.data, seed=0, num_clients=cfg.num_clients)
    train, _ = data.client_split(0)
    canaries = make_canaries(count=2, candidates=5, digits=4, seed=0)
    planted = plant_canaries(train, canaries, repeats=3)
    assert planted.column_names == train.column_names and len(planted) == len(train) + 6
    tail = planted.select(range(len(train), len(planted)))
    assert list(tail[instruct.RESPONSE]) == [s for s in canaries.secrets for _ in range(3)]
    assert set(tail[instruct.INSTRUCTION]) == {canaries.question} and set(tail[instruct.INPUT]) == {""}
    tokenizer = load_tokenizer(cfg.model)
    (example,) = canary_examples(cfg, tokenizer, canaries, canaries.secrets[:1])
    trained = instruct.encode_config(tail.select([0]), tokenizer, cfg.data, max_length=cfg.model.max_length)[0][0]
    assert example == trained  # scored exactly as it was trained on
    scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(scored, skip_special_tokens=True).replace(" ", "") == canaries.secrets[0].replace(" ", "")
    assert example["labels"][0] == -100  # the prompt is not scored


# ------------------------------------------------------------------------------ attacks on tiny models
def random_examples(n: int, *, seed: int, vocab: int = 50, labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (8,), generator=g).tolist()
        out.append(
            {"input_ids": ids, "attention_mask": [1] * 8, "labels": int(torch.randint(0, labels, (1,), generator=g))}
        )
    return out


def test_loss_attack_sees_a_memorised_training_set(tiny_bert):
    """Random labels can only be learnt by heart: after training, members' losses give them away."""
    from fedpeft.data.encoding import make_loader
    from fedpeft.training.local import train_local

    members, held_out = random_examples(16, seed=1), random_examples(16, seed=2)
    before = (
        {0: example_losses(tiny_bert, members, pad_token_id=0)},
        example_losses(tiny_bert, held_out, pad_token_id=0),
    )
    for p in tiny_bert.parameters():
        p.requires_grad_(True)  # the whole tiny model, so it memorises within a few dozen steps
    train_local(tiny_bert, make_loader(members, pad_token_id=0, batch_size=8, shuffle=True), num_steps=60, lr=1e-2)
    after = {0: example_losses(tiny_bert, members, pad_token_id=0)}, example_losses(tiny_bert, held_out, pad_token_id=0)
    report = membership_report(after[0], after[1], members_base=before[0], nonmembers_base=before[1])
    assert report["overall"]["auc"] > 0.9 and report["overall"]["calibrated_auc"] > 0.9
    assert report["per_client"]["0"]["members"] == 16 and report["overall"]["nonmembers"] == 16
    untrained = membership_report(before[0], before[1], members_base=before[0], nonmembers_base=before[1])
    assert untrained["overall"]["calibrated_auc"] == 0.5  # score 0 everywhere: the attack cannot tell


def test_a_repeated_canary_is_exposed_after_training():
    """A tiny LM that saw a secret 20 times ranks it first among 200 candidates; before, it does not."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.data.encoding import make_loader
    from fedpeft.training.local import train_local

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=16,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], task_type=TaskType.CAUSAL_LM),
    )
    canaries = make_canaries(count=1, candidates=200, digits=4, seed=3)
    prefix = [11, 12, 13]  # "my secret number is"; digits d -> token d + 1

    def tokens(secret: str) -> list[int]:
        return prefix + [int(d) + 1 for d in secret.split()]

    exposed_before, _ = exposure(*_nll(model, tokens(canaries.secrets[0]), [tokens(c) for c in canaries.candidates]))
    data = [
        {"input_ids": tokens(canaries.secrets[0]), "attention_mask": [1] * 7, "labels": tokens(canaries.secrets[0])}
    ] * 20
    train_local(model, make_loader(data, pad_token_id=0, batch_size=4, shuffle=True), num_steps=30, lr=2e-2)
    exposed_after, rank = exposure(*_nll(model, tokens(canaries.secrets[0]), [tokens(c) for c in canaries.candidates]))
    assert rank == 1 and exposed_after == pytest.approx(math.log2(201))
    assert exposed_before < exposed_after - 2


def lm_examples(seqs):
    return [{"input_ids": list(s), "attention_mask": [1] * len(s), "labels": list(s)} for s in seqs]


def _nll(model, canary, candidates):
    nll = sequence_nll(model, lm_examples([canary, *candidates]), pad_token_id=0)
    return float(nll[0]), nll[1:]


def test_sequence_nll_sums_the_token_losses_and_ignores_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    seqs = [[1, 2, 3, 4, 5], [6, 7]]
    batched = sequence_nll(model, lm_examples(seqs), pad_token_id=0)
    for seq, value in zip(seqs, batched):  # one at a time, no padding
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].double()
            manual = -torch.log_softmax(logits, dim=-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum()
        assert value == pytest.approx(manual.item(), rel=1e-5)
    # a prompt's labels are -100: only the response's tokens are scored
    prompt_masked = sequence_nll(
        model, [{"input_ids": seqs[0], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 4, 5]}], pad_token_id=0
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seqs[0]])).logits[0].double()
        manual = -(torch.log_softmax(logits[2], dim=-1)[4] + torch.log_softmax(logits[3], dim=-1)[5])
    assert prompt_masked[0] == pytest.approx(manual.item(), rel=1e-5)


def test_membership_report_is_json_ready():
    members, held_out = {0: np.array([0.1, 0.2]), 1: np.array([0.6])}, np.array([0.5, 0.05])
    report = membership_report(
        members, held_out, members_base={0: np.zeros(2), 1: np.full(1, 0.6)}, nonmembers_base=np.zeros(2)
    )
    report = json.loads(json.dumps(report))
    assert (
        report["per_client"]["0"]["auc"] == 0.5 and report["per_client"]["1"]["auc"] == 0.0
    )  # 0.1, 0.2 < 0.5 only; 0.6 < neither
    assert report["overall"]["auc"] == pytest.approx(2 / 6)
    assert report["per_client"]["1"]["calibrated_auc"] == 1.0  # 0.6 - 0.6 = 0 < 0.5 and < 0.05: a hard example, learnt


def test_run_audit_reads_a_run_directory_and_writes_audit_json(tmp_path):
    """The CLI path on a real run layout: config.yaml + final_adapter/ of the embedded model."""
    from omegaconf import OmegaConf

    from fedpeft.audit import main
    from fedpeft.cli.configs import compose_config
    from fedpeft.data.partition import prepare
    from fedpeft.server.evaluation import ServerEvaluator, initial_adapter
    from fedpeft.server.export import save_final
    from fedpeft.strategies.types import GlobalModel

    cfg = compose_config(
        [
            "num_clients=2",
            "clients_per_round=2",
            "data.max_samples=40",
            "model.max_length=16",
            "audit.max_examples=6",
            "model.lora.r=2",
        ]
    )
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients)
    evaluator = ServerEvaluator(cfg, data, lineage="audit-test")
    adapter = initial_adapter(evaluator.cm, rank=2, seed=0)
    adapter = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in adapter.items()
    }  # "trained"
    save_final(evaluator, GlobalModel(adapter=adapter, rank=2), tmp_path)
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 1, "clients": [{"partition": 1}, {"partition": 0}]}) + "\n"
    )

    main([str(tmp_path)])
    report = json.loads((tmp_path / "audit.json").read_text())
    overall = report["membership"]["overall"]
    assert overall["members"] == 12 and overall["nonmembers"] == 6 and 0.0 <= overall["auc"] <= 1.0
    assert set(report["membership"]["per_client"]) == {"0", "1"} and report["participation"] == {"0": 1, "1": 1}
    assert report["model"] == "final_adapter" and "canaries" not in report
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        main([str(tmp_path / "nowhere")])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["audit.canaries=2"], "needs model.task=causal_lm"),
        (["audit.enabled=true", "save_adapter=false"], "save_adapter=false"),
        (["audit.max_examples=0"], "max_examples must be >= 1"),
        (["audit.enabled=true", "mode=centralized"], "mode=centralized has none"),
        (["audit.canary_repeats=0"], "canary_repeats"),
        (
            ["+exp=llm_tiny", "audit.canaries=2", "audit.canary_client=4"],
            "audit.canary_client=4 is not a client of num_clients=4",
        ),
    ],
)
def test_audit_settings_that_cannot_work_fail_before_training(overrides, fragment):
    from fedpeft.cli.configs import compose_config
    from fedpeft.run import check_config

    with pytest.raises(ValueError, match=fragment):
        check_config(compose_config(overrides))


def test_canary_client_trains_on_its_canaries_and_only_it():
    from fedpeft.cli.configs import compose_config
    from fedpeft.data.partition import prepare
    from fedpeft.privacy.audit import client_train_split

    cfg = compose_config(
        [
            "num_clients=2",
            "data.max_samples=30",
            "data.partitioner=iid",
            "audit.canaries=2",
            "audit.canary_repeats=3",
            "audit.canary_client=1",
            "audit.candidates=10",
        ]
    )
    data = prepare(cfg.data, seed=cfg.seed, num_clients=2, need_labels=False)
    assert len(client_train_split(cfg, data, 0)) == len(data.client_split(0)[0])
    planted = client_train_split(cfg, data, 1)
    assert len(planted) == len(data.client_split(1)[0]) + 6
    assert sum(t.startswith("my secret number is") for t in planted["text"]) == 6
