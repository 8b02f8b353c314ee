"""Tokenised examples and the loaders that batch them.

:func:`encode_config` tokenises a dataset once, as the run's config says (text through
:func:`encode`; an instruction format through :mod:`fedpeft.data.instruct`: prompt template,
response-only labels), into a list of unpadded per-example dicts; :func:`make_loader` batches them
with the run's collator (:func:`collator_for`), padding each batch to its longest example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpeft.config.schema import Config
from fedpeft.data import instruct
from fedpeft.data.sources import LABEL, TEXT

if TYPE_CHECKING:
    from datasets import Dataset


def encode(ds: Dataset, tokenizer: Any, *, max_length: int, task: str) -> list[dict[str, Any]]:
    """Tokenise once: a list of per-example dicts (unpadded), ready for :class:`Collator`."""
    if len(ds) == 0:
        return []
    enc = tokenizer(list(ds[TEXT]), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    labels = list(ds[LABEL])
    out = []
    for i in range(len(ds)):
        example = {k: enc[k][i] for k in keys}
        example["labels"] = labels[i] if task == "seq_cls" else list(enc["input_ids"][i])
        out.append(example)
    return out


class Collator:
    """Pads a list of encoded examples to the longest one (labels of LMs are padded with -100)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key == "labels" and not isinstance(examples[0]["labels"], list):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
                continue
            fill = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            batch[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples], dtype=torch.long)
        return batch


def make_loader(
    examples: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader over encoded examples; shuffling draws from a generator seeded by ``seed``.

    ``collate_fn`` defaults to :class:`Collator` (see :func:`collator_for` for instruction data).
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples),  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_fn or Collator(pad_token_id),
    )


def encode_config(cfg: Config, ds: Dataset, tokenizer: Any) -> list[dict[str, Any]]:
    """Tokenise ``ds`` as the run's config (``cfg.data``, ``cfg.model``) says: an instruction format
    through :mod:`fedpeft.data.instruct` (prompt template, response-only labels), text through :func:`encode`."""
    if cfg.data.format != "text":
        return instruct.encode_config(ds, tokenizer, cfg.data, max_length=cfg.model.max_length)[0]
    return encode(ds, tokenizer, max_length=cfg.model.max_length, task=cfg.model.task)


def collator_for(cfg: Config, tokenizer: Any) -> Callable:
    """The batch collator of the run's data: ``DataCollatorForSeq2Seq`` for instruction formats."""
    if cfg.data.format != "text":
        return instruct.Collator(tokenizer)
    return Collator(tokenizer.pad_token_id)


def label_counts(labels: Sequence[int], num_labels: int) -> list[int]:
    """How many of ``labels`` are 0, 1, ..., ``num_labels - 1``."""
    return np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_labels).tolist()
