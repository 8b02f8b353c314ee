"""LLM evaluation: MC scoring against a hand-built model, response loss, answer extraction, generation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedpeft.config.schema import GenerationEval, MultipleChoiceEval
from fedpeft.data import instruct
from fedpeft.data.sources import DataError
from fedpeft.evaluation import llm as llm_eval
from fedpeft.models.paths import MINILM_CHAT_TEMPLATE


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    from fedpeft.models.paths import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:minilm"))
    tok.chat_template = MINILM_CHAT_TEMPLATE
    return tok


class Bigram(nn.Module):
    """A hand-built LM: the logits after token ``t`` are row ``t`` of a table, zero except what a test sets."""

    def __init__(self, vocab: int, entries: dict[tuple[int, int], float]) -> None:
        super().__init__()
        self.vocab, self.entries = vocab, entries

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float64)
        for (prev, nxt), logit in self.entries.items():
            logits[..., nxt] += torch.where(input_ids == prev, logit, 0.0)
        return SimpleNamespace(logits=logits)


def log_p(vocab: int, row: dict[int, float], token: int) -> float:
    """log softmax of a row that is zero except ``row``'s entries, by hand."""
    z = (vocab - len(row)) + sum(math.exp(v) for v in row.values())
    return row.get(token, 0.0) - math.log(z)


def tok_id(tokenizer, word: str) -> int:
    (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return token


def test_mc_scorer_picks_the_choice_the_hand_built_model_makes_most_likely(tokenizer):
    V = len(tokenizer)
    colon, sep = tok_id(tokenizer, ":"), tokenizer.sep_token_id
    red, green, blue = (tok_id(tokenizer, w) for w in ("red", "green", "blue"))
    # After "assistant :" the model prefers green (2.0) over blue (1.5); after green it is sure of [SEP]
    # only weakly (0.1), after blue strongly (6.0). Sum of log-probs: blue wins although green is likelier first.
    after_colon, after_green, after_blue = {green: 2.0, blue: 1.5}, {sep: 0.1}, {sep: 6.0}
    model = Bigram(V, {(colon, k): v for k, v in after_colon.items()} | {(green, sep): 0.1, (blue, sep): 6.0})
    expected = {
        "red": log_p(V, after_colon, red) + log_p(V, {}, sep),
        "green": log_p(V, after_colon, green) + log_p(V, after_green, sep),
        "blue": log_p(V, after_colon, blue) + log_p(V, after_blue, sep),
    }
    assert max(expected, key=expected.get) == "blue" and expected["green"] > expected["red"]
    row = {"instruction": "colour?", "input": "", "history": "[]"}
    questions = [
        llm_eval.ChoiceQuestion(row=row, choices=("red", "green", "blue"), answer=2, subject="art"),
        llm_eval.ChoiceQuestion(row=row, choices=("red", "green", "blue"), answer=1, subject="art"),
        llm_eval.ChoiceQuestion(row=row, choices=("green", "red"), answer=0, subject="physics"),
    ]
    # The scorer's per-choice log-likelihoods equal the hand computation ...
    per_choice = llm_eval.choice_examples(questions[:1], tokenizer, max_length=64)[0]
    scores = llm_eval.sequence_logliks(model, per_choice, collate=instruct.Collator(tokenizer), batch_size=2)
    for (score, count), choice in zip(scores, ("red", "green", "blue")):
        assert count == 2 and score == pytest.approx(expected[choice], abs=1e-5)
    # ... and the accuracy counts the argmax: blue (right), blue (wrong), green (right).
    result = llm_eval.mc_accuracy(model, questions, tokenizer, max_length=64, batch_size=4)
    assert result.accuracy == pytest.approx(2 / 3) and result.num_questions == 3
    assert result.per_subject == {"art": 0.5, "physics": 1.0}


def test_response_loss_is_the_token_mean_nll_and_perplexity_its_exp(tokenizer):
    V = len(tokenizer)
    colon, sep = tok_id(tokenizer, ":"), tokenizer.sep_token_id
    yes, no = tok_id(tokenizer, "yes"), tok_id(tokenizer, "no")
    model = Bigram(V, {(colon, yes): 3.0, (yes, sep): 1.0})
    rows = [{"instruction": "q", "input": "", "history": "[]", "response": r} for r in ("yes", "no", "yes no")]
    examples, _ = instruct.encode(rows, tokenizer, max_length=64)
    nll = -(
        log_p(V, {yes: 3.0}, yes)
        + log_p(V, {sep: 1.0}, sep)  # yes [SEP]
        + log_p(V, {yes: 3.0}, no)
        + log_p(V, {}, sep)  # no [SEP]
        + log_p(V, {yes: 3.0}, yes)
        + log_p(V, {sep: 1.0}, no)
        + log_p(V, {}, sep)  # yes no [SEP]
    )
    result = llm_eval.response_loss(model, examples, collate=instruct.Collator(tokenizer), batch_size=2)
    assert result.tokens == 7 and result.examples == 3
    assert result.loss == pytest.approx(nll / 7, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / 7), rel=1e-5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 + 4 = 7 dollars.\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("The answer is #### 2.50 dollars", "2.5"),
        ("#### $1,000,000.", "1000000"),
        ("so 12 apples, then 7 pears. The answer is 19.", "19"),  # no ####: the last number
        ("#### 0.0", "0"),
        ("#### -0", "0"),
        ("#### 100", "100"),
        ("#### .5", "0.5"),
        ("no number here", None),
        ("first #### 3 then #### 4", "4"),
    ],
)
def test_extract_answer(text, expected):
    assert llm_eval.extract_answer(text) == expected


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_mmlu_file_with_letters_and_subjects_is_read(tmp_path):
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"},
        {"question": "Sky?", "choices": json.dumps(["blue", "green", "red"]), "answer": "A", "subject": "nature"},
    ]
    cfg = MultipleChoiceEval(name=write_jsonl(tmp_path / "mmlu.jsonl", rows))
    qs = llm_eval.read_mc(cfg)
    assert [(q.choices, q.answer, q.subject) for q in qs] == [
        (("3", "4"), 1, "math"),
        (("blue", "green", "red"), 0, "nature"),
    ]
    lettered = llm_eval.read_mc(MultipleChoiceEval(name=cfg.name, choice_format="letter"))
    assert (
        lettered[1].choices == ("A", "B", "C")
        and lettered[1].row["instruction"] == "Sky?\nA. blue\nB. green\nC. red\nAnswer:"
    )
    with pytest.raises(DataError, match="out of range"):
        llm_eval.read_mc(
            MultipleChoiceEval(
                name=write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}])
            )
        )
    with pytest.raises(DataError, match=r"download it.*evaluation.mc.name=<local file>"):
        llm_eval.read_mc(MultipleChoiceEval(name="no-such-org/no-such-mmlu"))


class ScriptedLM(nn.Module):
    """``generate`` appends a fixed answer to every prompt (to test the plumbing around generation)."""

    def __init__(self, answers: dict[int, list[int]]) -> None:
        super().__init__()
        self.answers = answers  # keyed by the prompt's last real token
        self.widths: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.widths.append(input_ids.shape[1])
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        rows = []
        for ids in input_ids:
            new = self.answers[int(ids[-1])][:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new + [0] * (max_new_tokens - len(new)))]))
        return torch.stack(rows)


def test_exact_match_compares_the_final_numbers(tokenizer, tmp_path):
    rows = [
        {"question": "How many? one", "answer": "1 + 1 = 2\n#### 2"},
        {"question": "How much? two", "answer": "#### 1,234"},
        {"question": "Which? three", "answer": "#### 7"},
    ]
    items = llm_eval.read_generation(GenerationEval(name=write_jsonl(tmp_path / "gsm.jsonl", rows)))
    colon = tok_id(tokenizer, ":")
    out = {colon: tokenizer("so #### 2", add_special_tokens=False)["input_ids"]}
    model = ScriptedLM(out)
    result = llm_eval.exact_match(model, tokenizer, items[:1], max_length=64, max_new_tokens=8, batch_size=2)
    assert result.exact_match == 1.0
    answers = {colon: tokenizer("1234", add_special_tokens=False)["input_ids"]}
    result = llm_eval.exact_match(ScriptedLM(answers), tokenizer, items, max_length=64, max_new_tokens=8, batch_size=2)
    assert result.exact_match == pytest.approx(1 / 3) and result.num_questions == 3


def test_batched_left_padded_generation_equals_one_by_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    tok = SimpleNamespace(
        pad_token_id=0, eos_token_id=None, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids.tolist()))
    )
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    batched = llm_eval.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [llm_eval.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_generation_runs_in_the_models_autocast_dtype():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.training.local import AUTOCAST

    # Prepare: a tiny causal LM; a hook records the dtype its feed-forward computes in
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    tok = SimpleNamespace(
        pad_token_id=0, eos_token_id=None, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids.tolist()))
    )
    seen: set[torch.dtype] = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    # Execute: greedy generation without, then with, model.autocast's mark
    plain = llm_eval.generate(model, tok, [[5, 6, 7]], max_new_tokens=4, batch_size=1)
    assert seen == {torch.float32}
    seen.clear()
    setattr(model, AUTOCAST, torch.bfloat16)
    mixed = llm_eval.generate(model, tok, [[5, 6, 7]], max_new_tokens=4, batch_size=1)
    # Assert: the same kind of output, computed in bf16; the weights untouched
    assert seen == {torch.bfloat16}
    assert len(mixed[0].split()) == len(plain[0].split()) == 4
    assert {p.dtype for p in model.parameters()} == {torch.float32}
