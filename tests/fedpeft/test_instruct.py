"""Instruction data: response-only labels token by token, truncation, formats, natural partitions."""

from __future__ import annotations

import json

import pytest

from fedpeft.config.schema import DataConfig
from fedpeft.data import instruct
from fedpeft.data.partition import build
from fedpeft.data.sources import DataError, hf_datasets
from fedpeft.models.paths import MINILM_CHAT_TEMPLATE

ROW = {
    "instruction": "Name the capital.",
    "input": "The country is France.",
    "response": "Paris is the capital.",
    "history": "[]",
}


@pytest.fixture
def plain_tokenizer():
    """The embedded MiniLM tokenizer as shipped: no chat template, no BOS/EOS."""
    from transformers import AutoTokenizer

    from fedpeft.models.paths import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("embedded:minilm"))


@pytest.fixture
def chat_tokenizer(plain_tokenizer):
    plain_tokenizer.chat_template = MINILM_CHAT_TEMPLATE
    return plain_tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_part(example):
    return [t for t in example["labels"] if t != -100]


# ------------------------------------------------------------------------------ labels
def test_chat_template_labels_are_minus_100_on_the_prompt_and_the_response_ids_on_the_response(chat_tokenizer):
    example, cut = instruct.tokenize(instruct.render(ROW, chat_tokenizer), chat_tokenizer, max_length=256)
    # Independent construction: the strings MINILM_CHAT_TEMPLATE renders, written out by hand.
    prompt = ids(chat_tokenizer, "[CLS]user: Name the capital.\n\nThe country is France. [SEP] assistant:")
    response = ids(chat_tokenizer, " Paris is the capital. [SEP] ")
    assert cut == (0, 0)
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response
    assert example["attention_mask"] == [1] * len(prompt + response)
    assert response[-1] == chat_tokenizer.sep_token_id  # the end of turn is learned


def test_plain_template_is_alpacas_with_bos_and_eos(plain_tokenizer):
    plain_tokenizer.bos_token, plain_tokenizer.eos_token = "[CLS]", "[SEP]"
    example, _ = instruct.tokenize(instruct.render(ROW, plain_tokenizer), plain_tokenizer, max_length=256)
    prompt = [plain_tokenizer.cls_token_id] + ids(
        plain_tokenizer, "### Instruction:\nName the capital.\n\n### Input:\nThe country is France.\n\n### Response:\n"
    )
    response = ids(plain_tokenizer, "Paris is the capital.") + [plain_tokenizer.sep_token_id]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response
    no_input, _ = instruct.tokenize(
        instruct.render({**ROW, "input": ""}, plain_tokenizer), plain_tokenizer, max_length=256
    )
    assert plain_tokenizer.decode(no_input["input_ids"]).count("input") == 0


def test_train_on_prompt_labels_every_token(chat_tokenizer):
    example, _ = instruct.tokenize(
        instruct.render(ROW, chat_tokenizer), chat_tokenizer, max_length=256, train_on_prompt=True
    )
    assert example["labels"] == example["input_ids"]


def test_chat_rows_keep_earlier_turns_in_the_prompt_and_learn_the_last_answer(chat_tokenizer):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    ds = hf_datasets().Dataset.from_dict({"messages": [json.dumps(turns)]})
    rows, _ = instruct.normalise(ds, DataConfig(format="chat"))
    example, _ = instruct.tokenize(
        instruct.render(rows[0], chat_tokenizer, system_prompt="ignored: the row has one"),
        chat_tokenizer,
        max_length=256,
    )
    prompt = ids(
        chat_tokenizer,
        "[CLS]system: Be brief. [SEP] user: Hi [SEP] assistant: Hello [SEP] user: Capital of France? [SEP] assistant:",
    )
    assert example["labels"] == [-100] * len(prompt) + ids(chat_tokenizer, " Paris [SEP] ")
    assert example["input_ids"][: len(prompt)] == prompt


def test_a_chat_template_without_the_prefix_property_is_refused(chat_tokenizer):
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>>{% endif %}"
    )
    with pytest.raises(DataError, match="does not start with its own generation prompt"):
        instruct.render(ROW, chat_tokenizer)


# ------------------------------------------------------------------------------ truncation
def test_truncation_cuts_the_input_first_and_keeps_the_response(chat_tokenizer):
    long = {**ROW, "input": " ".join(f"word{i}" for i in range(200))}
    full, _ = instruct.tokenize(instruct.render(long, chat_tokenizer), chat_tokenizer, max_length=10_000)
    example, (prompt_cut, response_cut) = instruct.tokenize(
        instruct.render(long, chat_tokenizer), chat_tokenizer, max_length=40
    )
    assert len(example["input_ids"]) == 40
    assert response_cut == 0 and prompt_cut == len(full["input_ids"]) - 40
    assert response_part(example) == response_part(full)
    text = chat_tokenizer.decode(example["input_ids"])
    assert text.startswith("[CLS] user : name the capital.")  # the instruction survives
    assert text.endswith("[SEP] assistant : paris is the capital. [SEP]")  # template and response survive
    kept_input = ids(chat_tokenizer, long["input"])[
        : 40 - (len(full["input_ids"]) - len(ids(chat_tokenizer, long["input"])))
    ]
    head = len(ids(chat_tokenizer, "[CLS]user: Name the capital."))
    assert example["input_ids"][head : head + len(kept_input)] == kept_input  # the input's head, in order


def test_instruction_is_cut_after_the_input_and_the_response_only_when_the_template_fills_max_length(chat_tokenizer):
    row = {**ROW, "instruction": "a b c d e f g h", "input": "x y"}
    template_only = len(ids(chat_tokenizer, "[CLS]user: \n\n [SEP] assistant:"))  # 6 tokens
    response = ids(chat_tokenizer, " Paris is the capital. [SEP] ")  # 6 tokens
    example, (p, r) = instruct.tokenize(
        instruct.render(row, chat_tokenizer), chat_tokenizer, max_length=template_only + len(response) + 3
    )
    assert chat_tokenizer.decode(example["input_ids"]).startswith(
        "[CLS] user : a b c [SEP]"
    )  # input gone, then the instruction's tail
    assert (p, r) == (2 + 5, 0)
    example, (p, r) = instruct.tokenize(
        instruct.render(row, chat_tokenizer), chat_tokenizer, max_length=template_only + 2
    )
    assert r == len(response) - 2 and response_part(example) == response[:2]
    with pytest.raises(DataError, match="no room for the response"):
        instruct.tokenize(instruct.render(row, chat_tokenizer), chat_tokenizer, max_length=template_only)


def test_encode_counts_what_truncation_cut(chat_tokenizer):
    rows = [ROW, {**ROW, "input": "word " * 100}]
    _, stats = instruct.encode(rows, chat_tokenizer, max_length=48)
    assert stats.examples == 2 and stats.truncated == 1 and stats.response_tokens_cut == 0
    assert (
        stats.prompt_tokens_cut
        == len(
            instruct.tokenize(instruct.render(rows[1], chat_tokenizer), chat_tokenizer, max_length=10_000)[0][
                "input_ids"
            ]
        )
        - 48
    )


def test_collator_pads_inputs_with_the_pad_id_and_labels_with_minus_100(chat_tokenizer):
    examples, _ = instruct.encode([ROW, {**ROW, "input": ""}], chat_tokenizer, max_length=256)
    batch = instruct.Collator(chat_tokenizer)(examples)
    short = len(examples[1]["input_ids"])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"][1, short:].eq(chat_tokenizer.pad_token_id).all()
    assert batch["labels"][1, short:].eq(-100).all() and batch["attention_mask"][1, short:].eq(0).all()
    assert batch["labels"][1, :short].tolist() == examples[1]["labels"]


# ------------------------------------------------------------------------------ formats and partitions
def write_dolly(path, n_per_category=6):
    rows = []
    for cat in ("open_qa", "summarization", "classification"):
        for i in range(n_per_category):
            rows.append(
                {
                    "instruction": f"{cat} question {i}",
                    "context": "" if i % 2 else f"context {i}",
                    "response": f"answer {i}",
                    "category": cat,
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_dolly_by_category_gives_every_client_one_category(tmp_path):
    cfg = DataConfig(
        name=str(write_dolly(tmp_path / "dolly.jsonl")),
        format="dolly",
        partitioner="natural",
        partition_column="category",
        test_fraction=0.2,
    )
    data = build(cfg, seed=0, num_clients=3)
    assert data.label_names == ["classification", "open_qa", "summarization"]
    assert sorted(len(set(p["label"])) for p in data.partitions) == [1, 1, 1]
    assert sorted(p["label"][0] for p in data.partitions) == [0, 1, 2]
    assert set(data.test.column_names) >= {"instruction", "input", "response", "history", "label"}
    assert any(r["input"] for r in data.train) and all(r["response"].startswith("answer") for r in data.train)
    with pytest.raises(DataError, match="set num_clients=3"):
        build(cfg, seed=0, num_clients=4)


def test_columns_are_mapped_and_a_missing_column_is_named(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("q,ctx,a\n" + "\n".join(f"question {i},,answer {i}" for i in range(10)))
    cfg = DataConfig(
        name=str(path),
        format="alpaca",
        instruction_column="q",
        input_column="ctx",
        response_column="a",
        partitioner="iid",
    )
    data = build(cfg, seed=0, num_clients=2)
    assert sorted(list(data.train["instruction"]) + list(data.test["instruction"])) == sorted(
        f"question {i}" for i in range(10)
    )
    with pytest.raises(DataError, match=r"no column 'instruction'.*data.<field>_column"):
        build(DataConfig(name=str(path), format="alpaca", partitioner="iid"), seed=0, num_clients=2)
    with pytest.raises(DataError, match="set data.partition_column"):
        build(
            DataConfig(name=str(path), format="alpaca", instruction_column="q", response_column="a"),
            seed=0,
            num_clients=2,
        )


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"role": "user", "content": "hi"}], "last turn must be the assistant"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ("[]", "non-empty list"),
    ],
)
def test_bad_chat_rows_are_named(turns, message):
    with pytest.raises(DataError, match=message):
        instruct.parse_messages(turns if isinstance(turns, str) else json.dumps(turns), row=0)


def test_embedded_bbc_instructions_ask_for_the_topic():
    data = build(
        DataConfig(name=instruct.EMBEDDED_INSTRUCT, format="alpaca", partitioner="dirichlet", max_samples=100),
        seed=0,
        num_clients=2,
    )
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    row = data.test[0]
    assert row["instruction"] == instruct.BBC_QUESTION and row["response"] == data.label_names[row["label"]]
