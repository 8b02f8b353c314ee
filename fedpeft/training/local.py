"""The local training and evaluation loops shared by clients, the server and the baselines.

One loop serves the federated clients, the centralised reference run and the benchmark, so a
difference between them is a difference in data or aggregation, never in the optimiser.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the steps taken
    num_steps: int
    num_examples: int  # examples seen (with repetition over epochs)
    skipped_steps: int = 0  # float16 only: steps the loss scaler skipped (their gradients overflowed)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA and head) parameters; a fresh one every round."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)


def per_sample_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Loss per example, shape (batch,).

    Classification: cross-entropy of the logits. Causal LM: token cross-entropy averaged over each
    sample's own tokens (so the batch loss is a mean of per-sample means, which is what per-sample
    clipping in DP-SGD needs).
    """
    labels = batch["labels"]
    if labels.dim() == 2:
        logits, targets = shifted_lm_logits(model, batch)
        return lm_loss(logits, targets)
    return loss_from_logits(forward_logits(model, batch), labels)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under ``model`` (peft and Opacus wrappers unwrapped) takes ``logits_to_keep``."""
    inner: Any = model  # the wrappers' attributes (_module, get_base_model) are not nn.Module's
    while True:
        if hasattr(inner, "_module"):  # opacus GradSampleModule
            inner = inner._module
        elif hasattr(inner, "get_base_model"):  # peft
            inner = inner.get_base_model()
        else:
            break
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def shifted_lm_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of a causal LM, target t+1 predicted by the logits at t.

    Only positions that predict a labelled token (``labels != -100`` in some row) get logits:
    with a response-only loss the LM head, the biggest matmul of a small model with a large
    vocabulary, then runs on a few positions instead of all (``logits_to_keep``; the loss is the
    same as from full logits). Returns logits (batch, K, vocab) and targets (batch, K).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    positions = torch.nonzero((targets != -100).any(dim=0)).flatten()
    if 0 < positions.numel() < targets.shape[1] and _accepts_logits_to_keep(model):
        return outputs(model, **inputs, logits_to_keep=positions).logits, targets[:, positions]
    return outputs(model, **inputs).logits[:, :-1], targets


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token cross-entropy over each sample's own labelled targets (float32 at least)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    token_loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(targets.shape)
    mask = (targets != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


AUTOCAST = "fedpeft_autocast"  # set on a model built with model.autocast (fedpeft.models.adapters.cached_model): the dtype its forward computes in
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def autocast(model: nn.Module) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the dtype the model was built with (``model.autocast``); a no-op without it."""
    dtype = getattr(model, AUTOCAST, None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def outputs(model: nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)``, under ``torch.autocast`` when the model was built with ``model.autocast``.

    Only the forward is autocast: the backward follows its dtypes, while the trainable weights,
    their gradients, the optimizer and everything after the step stay in the weights' dtype. The
    logits come back in float32, so the loss is never computed in bf16.
    """
    if getattr(model, AUTOCAST, None) is None:
        return model(**inputs)
    with autocast(model):
        out = model(**inputs)
    out.logits = out.logits.float()
    return out


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return outputs(model, **{k: v for k, v in batch.items() if k != "labels"}).logits


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss from logits: (batch, num_labels) for classification, (batch, T, V) for LMs.

    Computed in float32 at least (bfloat16/float16 logits are upcast; float64 stays float64).
    """
    if logits.dtype != torch.float64:
        logits = logits.float()
    if logits.dim() == 2:  # sequence classification: (batch, num_labels)
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    return lm_loss(logits[:, :-1], labels[:, 1:])  # causal LM: predict token t+1 from tokens <= t


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _cycle(loader: DataLoader, num_steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield exactly ``num_steps`` batches, restarting the loader (a new shuffle) as needed."""
    taken = 0
    while taken < num_steps:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
            taken += 1
            if taken == num_steps:
                return
        if not yielded:
            raise ValueError("the training loader is empty: this client has no training examples")


def num_local_steps(*, num_examples: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """Steps for one round: ``local_steps`` if set, else ``local_epochs`` passes over the data."""
    if local_steps > 0:
        return local_steps
    return local_epochs * math.ceil(num_examples / batch_size)


def train_local(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_steps: int,
    lr: float,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters for ``num_steps`` optimiser steps.

    ``penalty``: a term of the parameters alone (no data) added to every step's loss, e.g. rank
    self-pruning's tail norm; the reported loss is the data loss without it.

    A float16 base gets a dynamic loss scaler (:func:`loss_scaler`); a step whose scaled gradients
    overflow is skipped, as mixed-precision training does, and counted in ``skipped_steps``.
    """
    model.train()
    optimizer = make_optimizer(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    scaler = loss_scaler(model, device)
    total_loss, seen, skipped = 0.0, 0, 0
    for batch in _cycle(loader, num_steps):
        batch = to_device(batch, device)
        loss = per_sample_loss(model, batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} after {seen} examples")
        optimizer.zero_grad(set_to_none=True)
        objective = loss if penalty is None else loss + penalty()
        if scaler is None:
            objective.backward()
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(objective).backward()
            scaler.step(optimizer)  # unscales first; skips the step if a gradient is inf/NaN
            scaler.update()
            skipped += int(scaler.get_scale() < scale)  # the scale only falls after an overflow
        total_loss += loss.item()
        seen += batch["labels"].shape[0]
    return TrainResult(
        loss=total_loss / max(num_steps, 1), num_steps=num_steps, num_examples=seen, skipped_steps=skipped
    )


# float16 gradients underflow below ~6e-8: the loss is scaled up before the backward and the
# gradients scaled back before the step. A small start (2^10, not the usual 2^16) because a
# client's round is a few dozen steps and every overflow at the start costs one of them.
LOSS_SCALE_START = 2.0**10


def loss_scaler(model: nn.Module, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler when the model computes in float16 (its frozen base), else None.

    The LoRA factors stay float32 (peft upcasts them), so no master copy is needed: the scaler
    only protects the float16 activations' gradients on their way back to the factors. bfloat16
    has float32's range and needs none.
    """
    if any(p.dtype == torch.float16 for p in model.parameters()):
        return torch.amp.GradScaler(torch.device(device).type, init_scale=LOSS_SCALE_START)
    return None


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device | str = "cpu") -> EvalResult:
    """Mean loss and accuracy (classification: argmax of logits; causal LM: next-token accuracy)."""
    model.eval()
    total_loss, count = 0.0, 0
    correct: float = 0
    for batch in loader:
        batch = to_device(batch, device)
        labels = batch["labels"]
        if labels.dim() == 1:  # classification
            logits = forward_logits(model, batch)
            losses = loss_from_logits(logits, labels)
            correct += (logits.argmax(dim=-1) == labels).sum().item()
        else:  # causal LM: next-token accuracy averaged per sample, logits only where labelled
            logits, target = shifted_lm_logits(model, batch)
            losses = lm_loss(logits, target)
            mask = target != -100
            correct += (
                ((logits.argmax(dim=-1) == target) & mask).sum(dim=1).div(mask.sum(dim=1).clamp(min=1)).sum().item()
            )
        total_loss += losses.sum().item()
        count += losses.shape[0]
    if count == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    return EvalResult(loss=total_loss / count, accuracy=correct / count, num_examples=count)
