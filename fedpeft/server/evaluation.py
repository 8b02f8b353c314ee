"""The server's own copy of the model, which scores a global model on the held-out test split.

:class:`ServerEvaluator` loads a :class:`GlobalModel` (moved base and adapter) into it; the
round-0 adapter a run starts from (:func:`initial_adapter`) is drawn from the same copy.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.config.schema import Config
from fedpeft.data.encoding import collator_for, encode_config, make_loader
from fedpeft.data.partition import FederatedData
from fedpeft.evaluation.llm import LLMEvaluator
from fedpeft.models import adapters as models
from fedpeft.protocol.records import State, fresh_lora, stack_to_delta
from fedpeft.strategies.types import GlobalModel
from fedpeft.training.local import EvalResult, evaluate


def initial_adapter(cm: models.CachedModel, *, rank: int | None, seed: int) -> State:
    """The round-0 adapter at ``rank``: A drawn from ``seed``, B zero (peft's init), the head (and any
    other tensor) as peft built it — not what the cached model's adapter holds after earlier jobs."""
    return fresh_lora(cm.built_state(rank), seed=seed)


class ServerEvaluator:
    """Evaluates a :class:`GlobalModel` on the held-out test split with the server's own model copy."""

    def __init__(self, cfg: Config, data: FederatedData, *, lineage: str) -> None:
        self.cfg = cfg
        self.lineage = lineage
        self.cm = models.cached_model(
            cfg.model, num_labels=data.num_labels, device=models.resolve_device(cfg.device), seed=cfg.seed
        )
        tokenizer = models.load_tokenizer(cfg.model)
        examples = encode_config(cfg, data.test, tokenizer)
        self.loader = make_loader(
            examples,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=cfg.server_eval_batch_size,
            shuffle=False,
            collate_fn=collator_for(cfg, tokenizer),
        )
        # Response loss, perplexity, MC accuracy, exact match (evaluation.*): its metrics join the row.
        self.llm = LLMEvaluator(cfg, data, tokenizer) if cfg.model.task == "causal_lm" else None
        self.extra: dict[str, Any] = {}

    def load(self, global_model: GlobalModel) -> torch.nn.Module:
        """Put the global model into the server's PEFT model and return it."""
        version = len(global_model.base_updates)
        done = self.cm.base_version if self.cm.base_lineage == self.lineage and version >= self.cm.base_version else 0
        deltas = [stack_to_delta(u) for u in global_model.base_updates[done:]]
        self.cm.use_base(self.lineage, deltas, version=version)
        model = self.cm.activate(global_model.rank)
        self.cm.load_adapter_state(global_model.rank, global_model.adapter)
        return model

    def __call__(self, global_model: GlobalModel) -> EvalResult:
        model = self.load(global_model)
        if self.llm is not None and self.llm.active:
            self.extra = self.llm(model, device=self.cm.device, batch_size=self.cfg.server_eval_batch_size)
        return evaluate(model, self.loader, device=self.cm.device)
