"""What a researcher reports for an instruction-tuned LM.

* :func:`response_loss`: the response-only loss (mean negative log-likelihood per response token)
  and its perplexity ``exp(loss)`` on the held-out split.
* :func:`mc_accuracy`: multiple-choice accuracy by log-likelihood (MMLU layout: ``question``,
  ``choices``, ``answer``). Each choice is rendered as the response to the question's prompt
  exactly as training renders a response (end-of-turn / EOS included) and scored by the sum of its
  tokens' log-probabilities; the argmax is the model's answer (lm-evaluation-harness' ``acc``).
  Per-subject accuracy when a subject column exists.
* :func:`exact_match`: batched greedy generation with ``max_new_tokens`` and exact match of the
  final answer (GSM8K layout: the number after ``####``; :func:`extract_answer`).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config.schema import Config, GenerationEval, MultipleChoiceEval
from fedpeft.data import instruct
from fedpeft.data.partition import FederatedData
from fedpeft.data.sources import DataError, hf_datasets
from fedpeft.models.llm import eval_mode
from fedpeft.training.local import autocast, shifted_lm_logits

Example = dict[str, list[int]]
Collate = Callable[[Sequence[Example]], dict[str, torch.Tensor]]


# ------------------------------------------------------------------------------ log-likelihoods
@torch.no_grad()
def sequence_logliks(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    collate: Collate,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[tuple[float, int]]:
    """(Σ log p(token), number of tokens) over the labelled tokens (``labels != -100``) of each example.

    Token t is predicted from tokens < t (the causal shift); log-probabilities in float32 at least.
    """
    out: list[tuple[float, int]] = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            logits, labels = shifted_lm_logits(model, batch)  # logits only where a label is
            mask = labels != -100
            logp = (
                torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
                .gather(-1, labels.clamp(min=0).unsqueeze(-1))
                .squeeze(-1)
            )
            sums = (logp * mask).sum(dim=1, dtype=torch.float64)
            out.extend((float(s), int(n)) for s, n in zip(sums.tolist(), mask.sum(dim=1).tolist()))
    return out


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean NLL per response token
    perplexity: float
    tokens: int
    examples: int


def response_loss(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    collate: Collate,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> LossResult:
    """Token-weighted response-only loss and perplexity of encoded examples (labels −100 on prompts)."""
    scores = sequence_logliks(model, examples, collate=collate, batch_size=batch_size, device=device)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        return LossResult(loss=float("nan"), perplexity=float("nan"), tokens=0, examples=len(examples))
    loss = -sum(s for s, _ in scores) / tokens
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, examples=len(examples))


# ------------------------------------------------------------------------------ multiple choice
@dataclass(frozen=True)
class ChoiceQuestion:
    """One question: a normalised instruction row (its response unused), the choices, the right index."""

    row: Mapping[str, Any]
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _answer_index(value: Any, num_choices: int, *, row: int) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:num_choices] and not value.strip().isdigit():
        return LETTERS.index(value.strip().upper())
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise DataError(f"multiple-choice row {row}: answer {value!r} is neither a choice index nor a letter") from None
    if not 0 <= index < num_choices:
        raise DataError(f"multiple-choice row {row}: answer {index} out of range for {num_choices} choices")
    return index


def _load(name: str, *, split: str, subset: str | None, what: str, override: str):
    """A local JSON/JSONL/CSV file or a HF dataset; a missing one fails with what to download and which override."""

    hf = hf_datasets()
    path = Path(name).expanduser()
    if path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{what} file {name!r}: expected .json, .jsonl or .csv")
        return hf.load_dataset(kind, data_files=str(path), split="train")
    if name.startswith((".", "/", "~")) or path.suffix.lower() in {".json", ".jsonl", ".csv"}:
        raise DataError(f"{what} file {name!r} does not exist")
    try:
        return hf.load_dataset(name, subset, split=split) if subset else hf.load_dataset(name, split=split)
    except Exception as err:  # the hub raises many types; what to do about it is what matters
        raise DataError(
            f"cannot load {what} {name!r}: download it (huggingface-cli download --repo-type dataset {name}) and set {override}=<local file> ({type(err).__name__})"
        ) from err


def read_mc(cfg: MultipleChoiceEval) -> list[ChoiceQuestion]:
    """Questions in MMLU layout from ``cfg.name`` (choices a list or its JSON string; answer an index or letter)."""
    ds = _load(
        str(cfg.name), split=cfg.split, subset=cfg.subset, what="multiple-choice set", override="evaluation.mc.name"
    )
    missing = [c for c in (cfg.question_column, cfg.choices_column, cfg.answer_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"multiple-choice set {cfg.name!r} has no column {missing[0]!r}; its columns are {ds.column_names}"
        )
    subjects = (
        list(ds[cfg.subject_column])
        if cfg.subject_column and cfg.subject_column in ds.column_names
        else [None] * len(ds)
    )
    out = []
    for i, (q, choices, answer, subject) in enumerate(
        zip(ds[cfg.question_column], ds[cfg.choices_column], ds[cfg.answer_column], subjects)
    ):
        choices = json.loads(choices) if isinstance(choices, str) else list(choices)
        if len(choices) < 2:
            raise DataError(f"multiple-choice row {i}: needs at least 2 choices, got {choices!r}")
        choices = tuple(str(c) for c in choices)
        index = _answer_index(answer, len(choices), row=i)
        if cfg.choice_format == "letter":
            listed = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))
            row = {instruct.INSTRUCTION: f"{q}\n{listed}\nAnswer:", instruct.INPUT: "", instruct.HISTORY: "[]"}
            choices = tuple(LETTERS[: len(choices)])
        elif cfg.choice_format == "text":
            row = {instruct.INSTRUCTION: str(q), instruct.INPUT: "", instruct.HISTORY: "[]"}
        else:
            raise DataError(f"evaluation.mc.choice_format must be 'text' or 'letter', got {cfg.choice_format!r}")
        out.append(
            ChoiceQuestion(row=row, choices=choices, answer=index, subject=None if subject is None else str(subject))
        )
    return spread(out, cfg.max_samples)


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spaced over the list (a sorted file's or split's head would
    hold only its first subjects or labels)."""
    if not limit or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


MAX_SPLIT_CHOICES = 20


def mc_from_split(rows: Sequence[Mapping[str, Any]], *, choices: Sequence[str]) -> list[ChoiceQuestion]:
    """Held-out instruction rows whose responses come from a closed set (the embedded BBC topics) as
    multiple-choice questions over that set."""
    choices = tuple(sorted(set(choices)))
    if len(choices) > MAX_SPLIT_CHOICES:
        raise DataError(
            f"evaluation.mc.name=test-split needs responses from a small closed set; this data has {len(choices)} distinct responses (> {MAX_SPLIT_CHOICES})"
        )
    index = {c: i for i, c in enumerate(choices)}
    return [ChoiceQuestion(row=dict(row), choices=choices, answer=index[str(row[instruct.RESPONSE])]) for row in rows]


@dataclass(frozen=True)
class MCResult:
    accuracy: float
    num_questions: int
    per_subject: dict[str, float] = field(default_factory=dict)


def choice_examples(
    questions: Sequence[ChoiceQuestion], tokenizer: Any, *, max_length: int, system_prompt: str | None = None
) -> list[list[Example]]:
    """Per question, one encoded example per choice: the prompt (−100) then the choice as the response."""
    out = []
    for q in questions:
        per_choice = []
        for choice in q.choices:
            rendered = instruct.render(q.row, tokenizer, system_prompt=system_prompt, response=choice)
            per_choice.append(instruct.tokenize(rendered, tokenizer, max_length=max_length)[0])
        out.append(per_choice)
    return out


def mc_accuracy(
    model: nn.Module,
    questions: Sequence[ChoiceQuestion],
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    system_prompt: str | None = None,
    collate: Collate | None = None,
) -> MCResult:
    """Accuracy of the argmax over each question's choices of Σ log p(choice tokens | prompt)."""
    if not questions:
        return MCResult(accuracy=float("nan"), num_questions=0)
    nested = choice_examples(questions, tokenizer, max_length=max_length, system_prompt=system_prompt)
    flat = [e for per in nested for e in per]
    scores = sequence_logliks(
        model, flat, collate=collate or instruct.Collator(tokenizer), batch_size=batch_size, device=device
    )
    right: dict[str | None, list[bool]] = defaultdict(list)
    at = 0
    for q, per in zip(questions, nested):
        logliks = [s for s, _ in scores[at : at + len(per)]]
        at += len(per)
        right[q.subject].append(max(range(len(logliks)), key=logliks.__getitem__) == q.answer)
    every = [r for rs in right.values() for r in rs]
    per_subject = {
        str(s): sum(rs) / len(rs) for s, rs in sorted(right.items(), key=lambda kv: str(kv[0])) if s is not None
    }
    return MCResult(accuracy=sum(every) / len(every), num_questions=len(every), per_subject=per_subject)


# ------------------------------------------------------------------------------ generation
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style text, canonical (``"#### 1,234"`` -> ``"1234"``).

    The first number after the last ``####`` when there is one, else the last number in the text;
    thousands separators and a ``$`` are dropped, trailing zeros of decimals too (``2.50`` -> ``2.5``).
    None when there is no number.
    """
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail.replace("$", ""))
    if not numbers:
        return None
    raw = numbers[0] if "####" in text else numbers[-1]
    try:
        value = Decimal(raw.replace(",", ""))
    except InvalidOperation:
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


@dataclass(frozen=True)
class GenerationResult:
    exact_match: float
    num_questions: int
    samples: list[dict[str, str]] = field(default_factory=list)  # the first few, for the log


def read_generation(cfg: GenerationEval) -> list[tuple[dict[str, str], str]]:
    """(normalised prompt row, reference answer text) pairs in GSM8K layout from ``cfg.name``."""
    ds = _load(
        str(cfg.name), split=cfg.split, subset=cfg.subset, what="generation set", override="evaluation.generation.name"
    )
    missing = [c for c in (cfg.question_column, cfg.answer_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"generation set {cfg.name!r} has no column {missing[0]!r}; its columns are {ds.column_names}")
    items = [
        ({instruct.INSTRUCTION: str(q), instruct.INPUT: "", instruct.HISTORY: "[]"}, str(a))
        for q, a in zip(ds[cfg.question_column], ds[cfg.answer_column])
    ]
    return spread(items, cfg.max_samples)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    with eval_mode(model), autocast(model):  # model.autocast: generation in bf16 too, like every other forward
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            out.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in generated)
    return out


def exact_match(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[tuple[Mapping[str, Any], str]],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    system_prompt: str | None = None,
) -> GenerationResult:
    """Share of items whose generated final answer equals the reference's (:func:`extract_answer`)."""
    if not items:
        return GenerationResult(exact_match=float("nan"), num_questions=0)
    prompts = [
        instruct.prompt_ids(
            instruct.render(row, tokenizer, system_prompt=system_prompt, response=""), tokenizer, budget=max_length
        )[0]
        for row, _ in items
    ]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    hits = []
    for (_, reference), output in zip(items, outputs):
        predicted, expected = extract_answer(output), extract_answer(reference)
        hits.append(predicted is not None and predicted == expected)
    samples = [
        {"question": str(row[instruct.INSTRUCTION])[:200], "output": out[:200], "reference": ref[-50:]}
        for (row, ref), out in list(zip(items, outputs))[:3]
    ]
    return GenerationResult(exact_match=sum(hits) / len(hits), num_questions=len(hits), samples=samples)


# ------------------------------------------------------------------------------ the server's evaluation
TEST_SPLIT = "test-split"


class LLMEvaluator:
    """Everything ``cfg.evaluation`` asks for, prepared once (tokenised, read from disk), run per call.

    Returns metrics under their own names: ``response_loss``, ``perplexity`` (held-out split of an
    instruction set), ``mc_accuracy`` and ``mc_accuracy_by_subject``, ``exact_match``.
    """

    def __init__(self, cfg: Config, data: FederatedData, tokenizer: Any) -> None:
        ev, self.cfg, self.tokenizer = cfg.evaluation, cfg, tokenizer
        self.collate = instruct.Collator(tokenizer)
        instruction_data = cfg.data.format != "text"
        self.test_examples = (
            instruct.encode_config(data.test, tokenizer, cfg.data, max_length=cfg.model.max_length)[0]
            if ev.response_loss and instruction_data
            else []
        )
        self.questions: list[ChoiceQuestion] = []
        if ev.mc.name == TEST_SPLIT:
            if not instruction_data:
                raise DataError(
                    "evaluation.mc.name=test-split scores the held-out split of an instruction set; data.format is 'text'"
                )
            responses = list(data.train[instruct.RESPONSE]) + list(data.test[instruct.RESPONSE])
            self.questions = spread(mc_from_split(list(data.test), choices=responses), ev.mc.max_samples)
        elif ev.mc.name:
            self.questions = read_mc(ev.mc)
        self.generation = read_generation(ev.generation) if ev.generation.name else []

    @property
    def active(self) -> bool:
        return bool(self.test_examples or self.questions or self.generation)

    def __call__(self, model: nn.Module, *, device: torch.device | str, batch_size: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        system = self.cfg.data.system_prompt
        if self.test_examples:
            loss = response_loss(model, self.test_examples, collate=self.collate, batch_size=batch_size, device=device)
            out.update(response_loss=loss.loss, perplexity=loss.perplexity)
        if self.questions:
            mc = mc_accuracy(
                model,
                self.questions,
                self.tokenizer,
                max_length=self.cfg.model.max_length,
                batch_size=batch_size,
                device=device,
                system_prompt=system,
                collate=self.collate,
            )
            out["mc_accuracy"] = mc.accuracy
            if mc.per_subject:
                out["mc_accuracy_by_subject"] = mc.per_subject
        if self.generation:
            gen = self.cfg.evaluation.generation
            em = exact_match(
                model,
                self.tokenizer,
                self.generation,
                max_length=self.cfg.model.max_length,
                max_new_tokens=gen.max_new_tokens,
                batch_size=gen.batch_size,
                device=device,
                system_prompt=system,
            )
            out["exact_match"] = em.exact_match
        return out
