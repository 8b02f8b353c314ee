"""The privacy audit's measurements: membership inference and canary exposure of a model.

* **membership inference**: the AUC of the loss-threshold attack (Yeom et al., "Privacy Risk in
  Machine Learning", CSF 2018: "the lower the loss, the more likely a member") separating each
  client's training examples from held-out ones, overall and per client; and its calibrated
  variant (score = loss under the final model minus loss under the round-0 model, which removes how
  hard an example is by itself; Watson et al., "On the Importance of Difficulty Calibration in
  Membership Inference Attacks", ICLR 2022). AUC 0.5 is chance, 1.0 a perfect attack.
* **canary exposure** (causal LMs): ``audit.canaries`` random secrets ``"d d d d d d"`` are
  planted ``audit.canary_repeats`` times each in client ``audit.canary_client``'s training data
  (:func:`client_train_split`), as the text ``"my secret number is d d d d d d"``
  (``data.format=text``) or, on instruction data, as the example "What is my secret number?" →
  ``"d d d d d d"`` rendered by the run's own prompt template; each canary's log-perplexity (the
  summed NLL of the tokens the run trains on: all but the first of a text, the response of an
  instruction) is ranked among ``audit.candidates`` = M random secrets of the same format in the
  same place, and ``exposure = log2(M + 1) - log2(rank)`` bits, rank 1 = the most likely ("The
  Secret Sharer", Carlini et al., USENIX Security 2019, §4, with the candidate set sampled as in
  their §4.2 extrapolation). M + 1 ≥ 2^exposure: ``log2(M + 1)`` is the most this estimate can
  show; a candidate tied with the canary counts as more likely (rank is an upper bound).

The audit of a finished run directory (``python -m fedpeft.audit``) is :mod:`fedpeft.audit`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.config.schema import Config
from fedpeft.data import instruct
from fedpeft.data.encoding import make_loader
from fedpeft.data.sources import LABEL, TEXT, hf_datasets
from fedpeft.training.local import forward_logits, per_sample_loss, to_device


# ------------------------------------------------------------------------------ the statistics
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order, ties given the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]]))
    ends = np.concatenate([starts[1:], [values.size]])
    ranks = np.empty(values.size, dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def auc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """``P(score of a positive > score of a negative) + P(equal) / 2``, exactly (Mann-Whitney U / (n_pos n_neg)).

    For the loss-threshold attack call it with ``positive = -member_losses``,
    ``negative = -nonmember_losses``.
    """
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs both classes, got {pos.size} positives and {neg.size} negatives")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("AUC of non-finite scores")
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def exposure(canary_nll: float, candidate_nlls: Sequence[float] | np.ndarray) -> tuple[float, int]:
    """(exposure in bits, rank) of a canary among M candidates: ``log2(M + 1) - log2(rank)``.

    ``rank = 1 + #{candidates with NLL <= the canary's}``: 1 when the canary is the most likely.
    """
    cands = np.asarray(candidate_nlls, dtype=np.float64)
    rank = 1 + int(np.count_nonzero(cands <= canary_nll))
    return math.log2(cands.size + 1) - math.log2(rank), rank


# ------------------------------------------------------------------------------ canaries
@dataclass(frozen=True)
class Canaries:
    """The planted secrets of a run and the candidates they are ranked against (all seeded)."""

    prefix: str
    secrets: list[str]
    candidates: list[str]
    question: str = "What is my secret number?"  # the instruction a secret answers, on instruction data

    def text(self, secret: str) -> str:
        return f"{self.prefix} {secret}"

    def row(self, secret: str) -> dict[str, Any]:
        """A normalised instruction row (:mod:`fedpeft.data.instruct`'s layout) whose response is ``secret``."""
        return {
            instruct.INSTRUCTION: self.question,
            instruct.INPUT: "",
            instruct.RESPONSE: secret,
            instruct.HISTORY: "[]",
            LABEL: 0,
        }


def make_canaries(
    *, count: int, candidates: int, digits: int, seed: int, prefix: str = "my secret number is"
) -> Canaries:
    """``count`` distinct random digit strings ("4 0 9 1 7 2") and ``candidates`` others of the same format.

    The candidates are drawn uniformly from the secrets' space, excluding the secrets, so a
    canary's rank measures what training taught the model, not the format.
    """
    space = 10**digits
    if count + candidates > space // 2:
        raise ValueError(
            f"{count} canaries + {candidates} candidates is too many for {digits}-digit secrets (space {space})"
        )
    rng = random.Random(f"canaries-{seed}")
    drawn = rng.sample(range(space), count + candidates)

    def spell(value: int) -> str:
        return " ".join(f"{value:0{digits}d}")

    return Canaries(
        prefix=prefix, secrets=[spell(v) for v in drawn[:count]], candidates=[spell(v) for v in drawn[count:]]
    )


def plant_canaries(train, canaries: Canaries, *, repeats: int):
    """``train`` with every canary appended ``repeats`` times, in ``train``'s own layout.

    A text dataset (``text``, ``label``) gets the canary text; a normalised instruction dataset gets
    the canary's instruction row (its response is the secret). Canaries are for causal LMs, which
    train on the tokens alone; their label is the first class (ignored by the LM loss, present only
    because every fedpeft dataset has the column).
    """
    hf = hf_datasets()
    planted = [s for s in canaries.secrets for _ in range(repeats)]
    if TEXT in train.column_names:
        rows = {TEXT: [canaries.text(s) for s in planted], LABEL: [0] * len(planted)}
    else:
        made = [canaries.row(s) for s in planted]
        rows = {k: [r[k] for r in made] for k in train.column_names}
    return hf.concatenate_datasets([train, hf.Dataset.from_dict(rows, features=train.features)])


def canary_examples(cfg: Config, tokenizer, canaries: Canaries, secrets: Sequence[str]) -> list[dict[str, list[int]]]:
    """``secrets`` tokenised as the run trains on them (labels: the tokens whose NLL is scored)."""
    if cfg.data.format == "text":
        ids = tokenizer([canaries.text(s) for s in secrets], truncation=True, max_length=cfg.model.max_length)[
            "input_ids"
        ]
        return [{"input_ids": list(x), "attention_mask": [1] * len(x), "labels": list(x)} for x in ids]
    return instruct.encode_config(
        [canaries.row(s) for s in secrets], tokenizer, cfg.data, max_length=cfg.model.max_length
    )[0]


def check_audit_config(cfg: Config) -> None:
    """Audit settings that cannot work, refused before training (``ValueError`` naming the key)."""
    a = cfg.audit
    if a.enabled and cfg.mode in ("centralized", "local"):
        raise ValueError(
            f"audit.enabled audits a federated run's final model; mode={cfg.mode} has none (audit its run directory by hand)"
        )
    if a.enabled and not cfg.save_adapter:
        raise ValueError("audit.enabled=true audits the final model, which save_adapter=false does not write")
    if a.max_examples is not None and a.max_examples < 1:
        raise ValueError(f"audit.max_examples must be >= 1, got {a.max_examples}")
    if a.canaries < 0 or a.canary_repeats < 1 or a.candidates < 1 or a.canary_digits < 1:
        raise ValueError(
            "audit.canaries must be >= 0 and audit.canary_repeats, audit.candidates, audit.canary_digits >= 1"
        )
    if a.canaries:
        if cfg.model.task != "causal_lm":
            raise ValueError(
                f"audit.canaries plants secrets in text a language model learns: it needs model.task=causal_lm, not {cfg.model.task!r}"
            )
        if not 0 <= a.canary_client < cfg.num_clients:
            raise ValueError(f"audit.canary_client={a.canary_client} is not a client of num_clients={cfg.num_clients}")
        make_canaries(
            count=a.canaries, candidates=a.candidates, digits=a.canary_digits, seed=cfg.seed
        )  # space large enough


def client_train_split(cfg: Config, data, partition_id: int):
    """Client ``partition_id``'s training set as it trains on it: with the canaries if it is the canary client."""
    train, _ = data.client_split(partition_id)
    a = cfg.audit
    if a.canaries and partition_id == a.canary_client:
        canaries = make_canaries(count=a.canaries, candidates=a.candidates, digits=a.canary_digits, seed=cfg.seed)
        train = plant_canaries(train, canaries, repeats=a.canary_repeats)
    return train


# ------------------------------------------------------------------------------ model scores
@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Per-example loss (the training loss: cross-entropy, or mean token NLL for LMs), in order."""
    model.eval()
    out = [
        per_sample_loss(model, to_device(b, device)).double().cpu()
        for b in make_loader(examples, pad_token_id=pad_token_id, batch_size=batch_size, shuffle=False)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Log-perplexity of each example: the summed NLL (nats) of its labelled tokens 2..T given their prefix
    (labels −100 are not scored: an instruction's prompt)."""
    model.eval()
    out = []
    for batch in make_loader(examples, pad_token_id=pad_token_id, batch_size=batch_size, shuffle=False):
        batch = to_device(batch, device)
        logits = forward_logits(model, batch)[:, :-1].double()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100
        )
        out.append(nll.view(labels.shape).sum(dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


# ------------------------------------------------------------------------------ the report
def membership_report(
    members: dict[int, np.ndarray],
    nonmembers: np.ndarray,
    *,
    members_base: dict[int, np.ndarray],
    nonmembers_base: np.ndarray,
) -> dict[str, Any]:
    """Loss-threshold and calibrated AUCs, overall and per client (losses: lower = more member-like)."""

    def both(m: np.ndarray, m_base: np.ndarray) -> dict[str, Any]:
        return {
            "auc": auc(-m, -nonmembers),
            "calibrated_auc": auc(-(m - m_base), -(nonmembers - nonmembers_base)),
            "members": int(m.size),
            "member_loss": float(m.mean()),
        }

    pooled = np.concatenate(list(members.values()))
    pooled_base = np.concatenate(list(members_base.values()))
    return {
        "overall": both(pooled, pooled_base)
        | {"nonmembers": int(nonmembers.size), "nonmember_loss": float(nonmembers.mean())},
        "per_client": {str(k): both(members[k], members_base[k]) for k in sorted(members) if members[k].size},
    }


def subsample(items: list, limit: int | None, *, seed: int) -> list:
    """At most ``limit`` items, a seeded uniform choice in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
