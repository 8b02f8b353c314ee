"""Instruction data for causal LMs: Alpaca, Dolly and chat formats, prompts, response-only labels.

Every source is normalised to one row layout before anything else happens::

    instruction  the user's request (Alpaca/Dolly ``instruction``; chat: the last user turn)
    input        optional context (Alpaca ``input``, Dolly ``context``; chat: empty)
    response     the target (Alpaca ``output``, Dolly ``response``; chat: the final assistant turn)
    history      JSON list of earlier {role, content} turns (chat only; else "[]")
    label        integer id of ``data.partition_column`` (Dolly ``category``), for the split and
                 the non-IID partitioners; 0 when no column is named

**The prompt.** With a tokenizer that has a chat template, the turns
``[system?] + history + [user: instruction + "\\n\\n" + input]`` go through
``apply_chat_template(..., add_generation_prompt=True)`` and the response is what the template adds
for the assistant turn (its end-of-turn marker included). Without one, the plain template
(Alpaca's, documented in :data:`PLAIN_TEMPLATE_DOC`) is used, a BOS token is put first and an EOS
token after the response when the tokenizer has them.

**The labels.** ``input_ids = prompt_ids + response_ids``; ``labels`` is −100 on every prompt token
(``train_on_prompt=True``: the prompt's own ids) and the response's ids on the response. Padding
(``transformers.DataCollatorForSeq2Seq``) adds −100, so the loss covers the response tokens only.

**Truncation keeps the response.** An example longer than ``max_length`` loses prompt tokens first:
from the end of the input (context), then from the end of earlier chat turns (oldest first), then
from the end of the instruction; the template's own tokens and the response stay. Only when the
template and the response alone do not fit is the response cut, from its end. What was cut is
counted in :class:`Truncation`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedpeft.config.schema import DataConfig
from fedpeft.data import sources
from fedpeft.data.sources import DataError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "dolly", "chat")
# The columns each format reads unless data.<x>_column maps them elsewhere.
DEFAULT_COLUMNS = {
    "alpaca": {"instruction": "instruction", "input": "input", "response": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "response": "response"},
    "chat": {"messages": "messages"},
}
ROLES = ("system", "user", "assistant")
INSTRUCTION, INPUT, RESPONSE, HISTORY, LABEL = "instruction", "input", "response", "history", "label"

EMBEDDED_INSTRUCT = "embedded:bbc-instruct"
BBC_QUESTION = "Which topic is this article about?"

PLAIN_TEMPLATE_DOC = """\
The plain template (tokenizers without a chat template), Alpaca's:

    {system}\\n\\n                          (when data.system_prompt is set)
    ### User:\\n{turn}\\n\\n                 (earlier chat turns, role capitalised)
    ### Instruction:\\n{instruction}\\n\\n
    ### Input:\\n{input}\\n\\n               (when the input is not empty)
    ### Response:\\n

followed by the response and the tokenizer's EOS token; a BOS token goes first when the tokenizer has one.
"""


# ------------------------------------------------------------------------------ reading
def columns(cfg: DataConfig) -> dict[str, str]:
    """The source column of each field of ``cfg.format``, after the ``data.*_column`` mappings."""
    if cfg.format not in FORMATS:
        raise DataError(f"data.format must be 'text' or one of {FORMATS}, got {cfg.format!r}")
    mapped = {
        "instruction": cfg.instruction_column,
        "input": cfg.input_column,
        "response": cfg.response_column,
        "messages": cfg.messages_column,
    }
    return {k: mapped[k] or v for k, v in DEFAULT_COLUMNS[cfg.format].items()}


def read_source(cfg: DataConfig) -> Dataset:
    """The configured instruction source: the embedded BBC set, a local file or a HF dataset."""
    if cfg.name == EMBEDDED_INSTRUCT:
        return bbc_instructions()
    return sources.read_raw(cfg)


def bbc_instructions() -> Dataset:
    """BBC News as instructions: "Which topic is this article about?" + article -> topic name.

    Alpaca layout (``instruction``, ``input``, ``output``) plus the ``topic`` column to split by.
    """
    ds = sources.read_text_folder(
        sources.embedded_bbc_dir(), strict=False
    )  # one article is Latin-1 (see read_text_folder)
    names = ds.features[sources.LABEL].names
    topics = [names[i] for i in ds[sources.LABEL]]
    return sources.hf_datasets().Dataset.from_dict(
        {"instruction": [BBC_QUESTION] * len(ds), "input": list(ds[sources.TEXT]), "output": topics, "topic": topics}
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def parse_messages(value: Any, *, row: int) -> list[dict[str, str]]:
    """A chat row's turns as a list of {role, content}; accepts a list or its JSON string."""
    turns = json.loads(value) if isinstance(value, str) else value
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"chat row {row}: 'messages' must be a non-empty list of {{role, content}}, got {type(turns).__name__}"
        )
    out = []
    for turn in turns:
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise DataError(f"chat row {row}: every turn needs 'role' and 'content', got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise DataError(f"chat row {row}: unknown role {turn['role']!r}; roles are {ROLES}")
        out.append({"role": str(turn["role"]), "content": _text(turn["content"])})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"chat row {row}: the last turn must be the assistant's (the response), got {out[-1]['role']!r}"
        )
    if len(out) < 2 or out[-2]["role"] != "user":
        raise DataError(f"chat row {row}: the response must follow a user turn")
    return out


def normalise(ds: Dataset, cfg: DataConfig) -> tuple[Dataset, list[str]]:
    """Rows in the layout of the module docstring; returns (dataset, names of the label ids)."""
    cols = columns(cfg)
    partition = cfg.partition_column or ("topic" if cfg.name == EMBEDDED_INSTRUCT else None)
    needed = [c for k, c in cols.items() if k != "input"] + ([partition] if partition else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{cfg.format} data {cfg.name!r} has no column {missing[0]!r}; its columns are {ds.column_names} (map it with data.<field>_column)"
        )
    rows: dict[str, list] = {INSTRUCTION: [], INPUT: [], RESPONSE: [], HISTORY: []}
    if cfg.format == "chat":
        for i, value in enumerate(ds[cols["messages"]]):
            turns = parse_messages(value, row=i)
            rows[INSTRUCTION].append(turns[-2]["content"])
            rows[INPUT].append("")
            rows[RESPONSE].append(turns[-1]["content"])
            rows[HISTORY].append(json.dumps(turns[:-2]))
    else:
        n = len(ds)
        responses = list(ds[cols["response"]])
        empty = [i for i, r in enumerate(responses) if r is None]
        if empty:
            raise DataError(
                f"{cfg.format} data {cfg.name!r}: response column {cols['response']!r} is empty in rows {empty[:5]}"
            )
        rows[INSTRUCTION] = [_text(v) for v in ds[cols["instruction"]]]
        rows[INPUT] = [_text(v) for v in ds[cols["input"]]] if cols["input"] in ds.column_names else [""] * n
        rows[RESPONSE] = [str(v) for v in responses]
        rows[HISTORY] = ["[]"] * n
    if partition:
        values = [_text(v) for v in ds[partition]]
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        rows[LABEL] = [index[v] for v in values]
    else:
        names, rows[LABEL] = ["all"], [0] * len(ds)
    hf = sources.hf_datasets()
    return hf.Dataset.from_dict(rows).cast_column(LABEL, hf.ClassLabel(names=names)), names


def drop_duplicates(ds: Dataset) -> Dataset:
    """Keep the first of identical (history, instruction, input, response) rows (a duplicate on both
    sides of the test split leaks it)."""
    seen: set[tuple] = set()
    keep = []
    for i, key in enumerate(zip(ds[HISTORY], ds[INSTRUCTION], ds[INPUT], ds[RESPONSE])):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ds.select(keep) if len(keep) < len(ds) else ds


# ------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Rendered:
    """One example as text: the prompt, the response, and the prompt's cuttable character spans
    (in the order they are cut, each from its end)."""

    prompt: str
    response: str
    cuttable: tuple[tuple[int, int], ...]
    bos: bool = False  # put the tokenizer's BOS id first (plain template)
    eos: bool = False  # put the tokenizer's EOS id last (plain template)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_content(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def render(
    row: Mapping[str, Any], tokenizer: Any, *, system_prompt: str | None = None, response: str | None = None
) -> Rendered:
    """The prompt and response of a normalised row (``response`` replaces the row's, for scoring choices)."""
    instruction, input_ = str(row[INSTRUCTION]), str(row.get(INPUT, "") or "")
    history = json.loads(row.get(HISTORY) or "[]")
    answer = str(row[RESPONSE]) if response is None else response
    if history and history[0]["role"] == "system":
        system_prompt = None  # the conversation brings its own
    turns = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
    if has_chat_template(tokenizer):
        return _render_chat(tokenizer, turns, instruction, input_, answer)
    return _render_plain(tokenizer, turns, instruction, input_, answer)


def _render_chat(tokenizer: Any, turns: list[dict], instruction: str, input_: str, answer: str) -> Rendered:
    content = user_content(instruction, input_)
    messages = [*turns, {"role": "user", "content": content}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template renders a conversation that does not start with its own generation prompt, "
            "so the response cannot be told apart from the prompt; set a template with that property (tokenizer.chat_template)"
        )
    # Locate each turn's content in the rendered prompt, in order (a template may add text around it).
    spans: list[tuple[int, int]] = []
    cursor = 0
    located = []
    for text in [t["content"] for t in turns] + [content]:
        at = prompt.find(text, cursor) if text else -1
        located.append((at, at + len(text)) if at >= 0 else None)
        cursor = at + len(text) if at >= 0 else cursor
    user = located[-1]
    if user is not None and input_:
        start = user[1] - len(input_)
        spans.append((start, user[1]))  # the input: the end of the user turn
    spans.extend(s for s in located[:-1] if s is not None)  # earlier turns, oldest first
    if user is not None:
        spans.append((user[0], user[0] + len(instruction)))
    return Rendered(prompt=prompt, response=full[len(prompt) :], cuttable=tuple(spans))


def _render_plain(tokenizer: Any, turns: list[dict], instruction: str, input_: str, answer: str) -> Rendered:
    parts: list[str] = []
    history_spans, pos = [], 0

    def add(text: str) -> None:
        nonlocal pos
        parts.append(text)
        pos += len(text)

    for turn in turns:
        if turn["role"] != "system":
            add(f"### {turn['role'].capitalize()}:\n")
        history_spans.append((pos, pos + len(turn["content"])))
        add(f"{turn['content']}\n\n")
    add("### Instruction:\n")
    instruction_span = (pos, pos + len(instruction))
    add(f"{instruction}\n\n")
    spans = []
    if input_:
        add("### Input:\n")
        spans.append((pos, pos + len(input_)))
        add(f"{input_}\n\n")
    add("### Response:\n")
    return Rendered(
        prompt="".join(parts),
        response=answer,
        cuttable=tuple(spans + history_spans + [instruction_span]),
        bos=getattr(tokenizer, "bos_token_id", None) is not None,
        eos=getattr(tokenizer, "eos_token_id", None) is not None,
    )


# ------------------------------------------------------------------------------ tokenising
@dataclass
class Truncation:
    """What truncation to ``max_length`` cut from a set of examples."""

    examples: int = 0
    truncated: int = 0  # examples that lost any token
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0

    def add(self, prompt_cut: int, response_cut: int) -> None:
        self.examples += 1
        self.truncated += int(prompt_cut + response_cut > 0)
        self.prompt_tokens_cut += prompt_cut
        self.response_tokens_cut += response_cut


def prompt_ids(rendered: Rendered, tokenizer: Any, *, budget: int) -> tuple[list[int], int]:
    """The prompt's token ids cut to at most ``budget`` tokens; returns (ids, tokens cut).

    Tokens are removed from the end of each cuttable span in turn (see the module docstring), so
    the remaining ids are the whole prompt's tokenisation with some tokens left out.
    """
    bos = [tokenizer.bos_token_id] if rendered.bos else []
    enc = tokenizer(
        rendered.prompt,
        add_special_tokens=False,
        return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
        verbose=False,
    )
    ids = bos + list(enc["input_ids"])
    excess = len(ids) - budget
    if excess <= 0:
        return ids, 0
    drop: set[int] = set()
    offsets = enc.get("offset_mapping")
    if offsets is not None:
        for start, end in rendered.cuttable:
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end and i not in drop]
            for i in reversed(inside):
                if len(drop) == excess:
                    break
                drop.add(i)
            if len(drop) == excess:
                break
    else:  # a slow tokenizer has no offsets: cut from the start of the prompt
        drop = set(range(min(excess, len(enc["input_ids"]))))
    kept = [t for i, t in enumerate(enc["input_ids"]) if i not in drop]
    return bos + kept, len(drop)


def response_ids(rendered: Rendered, tokenizer: Any) -> list[int]:
    ids = list(tokenizer(rendered.response, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if rendered.eos else [])


def tokenize(
    rendered: Rendered, tokenizer: Any, *, max_length: int, train_on_prompt: bool = False
) -> tuple[dict[str, list[int]], tuple[int, int]]:
    """One training example and (prompt tokens cut, response tokens cut)."""
    response = response_ids(rendered, tokenizer)
    prompt, prompt_cut = prompt_ids(rendered, tokenizer, budget=max(max_length - len(response), 0))
    response_cut = max(len(prompt) + len(response) - max_length, 0)  # the template alone does not fit
    if response_cut:
        response = response[: len(response) - response_cut]
    if not response:
        raise DataError(
            f"model.max_length={max_length} leaves no room for the response: the prompt template alone takes {len(prompt)} tokens; raise model.max_length"
        )
    ids = prompt + response
    labels = (list(prompt) if train_on_prompt else [-100] * len(prompt)) + list(response)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, (prompt_cut, response_cut)


def encode(
    ds: Dataset | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, list[int]]], Truncation]:
    """Tokenise normalised rows once: (examples ready for :func:`collator`, what truncation cut)."""
    stats = Truncation()
    out = []
    for row in ds:
        example, (p, r) = tokenize(
            render(row, tokenizer, system_prompt=system_prompt),
            tokenizer,
            max_length=max_length,
            train_on_prompt=train_on_prompt,
        )
        stats.add(p, r)
        out.append(example)
    if stats.truncated:
        log.info(
            "truncation to %d tokens cut %d prompt and %d response tokens from %d of %d examples",
            max_length,
            stats.prompt_tokens_cut,
            stats.response_tokens_cut,
            stats.truncated,
            stats.examples,
        )
    return out, stats


def encode_config(
    ds: Dataset, tokenizer: Any, cfg: DataConfig, *, max_length: int
) -> tuple[list[dict[str, list[int]]], Truncation]:
    return encode(
        ds, tokenizer, max_length=max_length, train_on_prompt=cfg.train_on_prompt, system_prompt=cfg.system_prompt
    )


@dataclass
class Collator:
    """``transformers.DataCollatorForSeq2Seq`` (input ids padded with the pad id, labels with −100),
    returning a plain dict of tensors."""

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    _inner: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import DataCollatorForSeq2Seq  # start-up: transformers only once a collator is built

        if self.tokenizer.pad_token_id is None:
            raise DataError(
                "the tokenizer has no pad token; set tokenizer.pad_token (fedpeft.models.adapters.load_tokenizer uses EOS)"
            )
        self._inner = DataCollatorForSeq2Seq(
            self.tokenizer,
            padding=True,
            label_pad_token_id=-100,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        keep = ("input_ids", "attention_mask", "labels")
        return {k: v for k, v in self._inner([{k: e[k] for k in keep} for e in examples]).items()}
