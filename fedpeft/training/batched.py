"""Train several clients' LoRA adapters in one lockstep pass over one shared copy of the base model.

Clients of a round share the frozen base W (FLoRA / FedEx-LoRA: the same merged base) and differ
only in their adapters and data. A pass concatenates one batch of every client that still has steps
to take, sends it through the base once, and routes each client's rows through its own adapter:

* an adapted ``nn.Linear``: ``y = W x + s_k B_k (A_k x)`` for the rows of client k, computed for all
  clients at once with two batched matmuls over the stacked factors
  ``A: (K, r_max, d_in)``, ``B: (K, d_out, r_max)``, scaling ``s: (K,)``;
* a trained head (peft ``modules_to_save``, a ``nn.Linear``): ``y = H_k x + b_k`` stacked the same way.

Each client keeps its own parameters at its own rank (what peft's ``get_peft_model_state_dict`` of
its adapter holds) and its own optimiser, built by :func:`fedpeft.training.local.make_optimizer` exactly
as :func:`fedpeft.training.local.train_local` builds it. The stacks are assembled from those parameters in
every forward, zero-padded to the largest rank of the pass: padding is never a parameter, so it gets
no gradient and cannot drift. The loss is ``Σ_k mean_k`` (client k's mean per-sample loss), and
client k's parameters touch only client k's rows, so each client's gradient is the gradient it would
get alone. A client that has taken all its steps leaves the pass: no rows, no optimiser step, no
weight decay. Data order is each client's own loader, cycled as ``train_local`` cycles it.

What stays equal to training each client alone (docs/methods.md, invariant 12) is everything but dropout:
dropout masks (the base model's and LoRA's) are drawn for the combined batch, so with dropout on
each client still gets independent masks of the same rate, but not the masks the same client
draws alone. Equality to the one-client path is exact up to floating-point summation order when
every dropout is off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from fedpeft.training.local import TrainResult, _cycle, forward_logits, loss_from_logits, make_optimizer, to_device

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


class BatchedError(ValueError):
    """A model or client set the batched pass cannot train (the message says what it can)."""


@dataclass
class ClientTask:
    """One client's local training, as the one-client path would run it.

    ``adapter`` is the start state, keyed as ``get_peft_model_state_dict(model, adapter_name=...)``
    keys the peft adapter ``adapter_name`` (which fixes the client's rank, scaling and dropout);
    ``frozen`` names keys of it that do not train (e.g. every LoRA A under FFA-LoRA).
    ``batches`` is the client's training loader (re-iterated, i.e. reshuffled, when it runs out).
    """

    adapter_name: str
    adapter: Mapping[str, torch.Tensor]
    batches: Iterable[Mapping[str, torch.Tensor]]
    num_steps: int
    lr: float
    weight_decay: float = 0.0
    frozen: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class ClientOutcome:
    result: TrainResult
    adapter: dict[str, torch.Tensor]  # the trained state, same keys as the task's, detached on CPU


# ------------------------------------------------------------------------------ row routing
class _Pass:
    """Which clients have rows in the current forward, and how many (their rows are contiguous)."""

    def __init__(self) -> None:
        self.clients: list[int] = []
        self.counts: list[int] = []

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *mid, d) rows of all clients -> (K, M, d), client k's rows zero-padded to the largest batch."""
        if len(set(self.counts)) == 1:
            return x.reshape(len(self.counts), -1, x.shape[-1])
        width = max(self.counts)
        chunks = [
            torch.cat([c, c.new_zeros(width - c.shape[0], *c.shape[1:])]) if c.shape[0] < width else c
            for c in x.split(self.counts)
        ]
        return torch.stack(chunks).reshape(len(self.counts), -1, x.shape[-1])

    def ungroup(self, y: torch.Tensor, rows: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`group`: (K, M, d_out) -> (N, *mid, d_out), ``rows`` being the input's (N, *mid)."""
        mid = rows[1:]
        if len(set(self.counts)) == 1:
            return y.reshape(*rows, y.shape[-1])
        y = y.reshape(len(self.counts), max(self.counts), *mid, y.shape[-1])
        return torch.cat([y[k, :n] for k, n in enumerate(self.counts)])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t if t.shape[1] == cols else torch.cat([t, t.new_zeros(t.shape[0], cols - t.shape[1])], dim=1)


class StackedLoraLinear(nn.Module):
    """Stands in for a peft ``lora.Linear`` during a pass: the shared base layer plus every client's factors."""

    def __init__(
        self,
        layer: LoraLinear,
        pass_: _Pass,
        *,
        lora_a: list[nn.Parameter],
        lora_b: list[nn.Parameter],
        scaling: list[float],
        dropout: list[nn.Module],
    ) -> None:
        super().__init__()
        self.base_layer = layer.get_base_layer()
        self.pass_ = pass_
        # Plain lists, not ParameterLists: the parameters belong to the clients, not to this module.
        self.lora_a, self.lora_b, self.dropout, self.scaling = lora_a, lora_b, dropout, scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        clients = self.pass_.clients
        a = [self.lora_a[k] for k in clients]  # (r_k, d_in)
        b = [self.lora_b[k] for k in clients]  # (d_out, r_k)
        r_max = max(t.shape[0] for t in a)
        stack_a = torch.stack([_pad_rows(t, r_max) for t in a])  # (K, r_max, d_in)
        stack_b = torch.stack([_pad_cols(t, r_max) for t in b])  # (K, d_out, r_max)
        x = x.to(stack_a.dtype)
        if any(not isinstance(self.dropout[k], nn.Identity) for k in clients):
            # Each client's rows through its own dropout module (its own rate), in pass order.
            x = torch.cat([self.dropout[k](c) for k, c in zip(clients, x.split(self.pass_.counts))])
        xk = self.pass_.group(x)  # (K, M, d_in)
        update = torch.bmm(torch.bmm(xk, stack_a.transpose(1, 2)), stack_b.transpose(1, 2))  # (K, M, d_out)
        scales = [self.scaling[k] for k in clients]
        if len(set(scales)) == 1:  # the usual case: a Python float, as peft multiplies
            update = update * scales[0]
        else:
            update = update * torch.tensor(scales, dtype=update.dtype, device=update.device).view(-1, 1, 1)
        return (result + self.pass_.ungroup(update, result.shape[:-1])).to(result.dtype)


class StackedLinearHead(nn.Module):
    """Stands in for a peft ``ModulesToSaveWrapper`` around a ``nn.Linear``: one head per client."""

    def __init__(self, pass_: _Pass, *, weight: list[nn.Parameter], bias: list[nn.Parameter | None]) -> None:
        super().__init__()
        self.pass_, self.weight, self.bias = pass_, weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.pass_.clients
        stack_w = torch.stack([self.weight[k] for k in clients])  # (K, d_out, d_in)
        out = torch.bmm(self.pass_.group(x.to(stack_w.dtype)), stack_w.transpose(1, 2))  # (K, M, d_out)
        if self.bias[clients[0]] is not None:
            out = out + torch.stack([b for k in clients if (b := self.bias[k]) is not None]).unsqueeze(1)
        return self.pass_.ungroup(out, x.shape[:-1])


# ------------------------------------------------------------------------------ the model swap
@dataclass
class _ClientParams:
    params: dict[str, nn.Parameter]  # adapter key -> this client's tensor (trainable or frozen)


def _split_key(key: str) -> tuple[str, str]:
    """``<module>.lora_A.weight`` -> (module, "lora_A"); ``<head>.<param>`` -> (head, param)."""
    for suffix, kind in ((LORA_A, "lora_A"), (LORA_B, "lora_B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    module, _, param = key.rpartition(".")
    return module, param


def _client_params(model: nn.Module, task: ClientTask, *, device: torch.device) -> _ClientParams:
    modules = dict(model.named_modules())
    params: dict[str, nn.Parameter] = {}
    for key, tensor in task.adapter.items():
        module_name, kind = _split_key(key)
        module = modules.get(module_name)
        if kind in ("lora_A", "lora_B"):
            if not isinstance(module, LoraLayer) or task.adapter_name not in getattr(module, kind):
                raise BatchedError(
                    f"adapter key {key!r}: the model has no LoRA layer {module_name!r} with adapter {task.adapter_name!r}"
                )
            like = getattr(module, kind)[task.adapter_name].weight
        else:
            if not isinstance(module, ModulesToSaveWrapper) or task.adapter_name not in module.modules_to_save:
                raise BatchedError(
                    f"adapter key {key!r}: {module_name!r} is neither a LoRA layer nor a modules_to_save head of adapter {task.adapter_name!r}"
                )
            like = getattr(module.modules_to_save[task.adapter_name], kind)
        if tuple(tensor.shape) != tuple(like.shape):
            raise BatchedError(
                f"adapter key {key!r}: shape {tuple(tensor.shape)}, adapter {task.adapter_name!r} has {tuple(like.shape)}"
            )
        params[key] = nn.Parameter(
            tensor.detach().to(device=device, dtype=like.dtype, copy=True), requires_grad=key not in task.frozen
        )
    return _ClientParams(params)


def _check_lora_layer(name: str, layer: nn.Module, adapter: str) -> None:
    if not isinstance(layer, LoraLinear):
        raise BatchedError(
            f"{name}: the batched pass handles LoRA on nn.Linear layers, not {type(layer).__name__}; use engine=ray"
        )
    if adapter in layer.lora_variant:
        raise BatchedError(
            f"{name}: adapter {adapter!r} is a LoRA variant ({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA); the batched pass trains plain LoRA only"
        )
    if layer.lora_B[adapter].bias is not None:
        raise BatchedError(f"{name}: adapter {adapter!r} has lora_bias=True; the batched pass trains plain LoRA only")
    if layer.merged:
        raise BatchedError(f"{name}: an adapter is merged into the base layer; unmerge it before a batched pass")


@contextmanager
def stacked_model(model: nn.Module, tasks: Sequence[ClientTask], clients: Sequence[_ClientParams]):
    """Swap the model's LoRA layers and heads for stacked ones for the duration of a pass (restored after)."""
    pass_ = _Pass()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)
    covered: set[str] = set()
    parents = {name: module for name, module in model.named_modules()}
    try:
        for name, module in list(model.named_modules()):
            keys = {f"{name}{LORA_A}", f"{name}{LORA_B}"}
            if isinstance(module, LoraLayer):
                present = [keys <= set(c.params) for c in clients]
                if not any(present):
                    continue
                if not all(present):
                    missing = [t.adapter_name for t, p in zip(tasks, present) if not p]
                    raise BatchedError(
                        f"LoRA layer {name!r} is adapted for some clients but not for adapters {missing}; clients of one pass must adapt the same layers"
                    )
                for t in tasks:
                    _check_lora_layer(name, module, t.adapter_name)
                new = StackedLoraLinear(
                    module,
                    pass_,
                    lora_a=[c.params[f"{name}{LORA_A}"] for c in clients],
                    lora_b=[c.params[f"{name}{LORA_B}"] for c in clients],
                    scaling=[float(module.scaling[t.adapter_name]) for t in tasks],
                    dropout=[module.lora_dropout[t.adapter_name] for t in tasks],
                )
            elif isinstance(module, ModulesToSaveWrapper):
                head_keys = [{k for k in c.params if _split_key(k)[0] == name} for c in clients]
                if not any(head_keys):
                    continue
                heads = [module.modules_to_save[t.adapter_name] for t in tasks]
                if not all(isinstance(h, nn.Linear) for h in heads):
                    raise BatchedError(
                        f"head {name!r} is a {type(heads[0]).__name__}; the batched pass trains nn.Linear heads (modules_to_save) only"
                    )
                if any(ks != head_keys[0] for ks in head_keys):
                    raise BatchedError(
                        f"head {name!r}: clients of one pass carry different head tensors {[sorted(k) for k in head_keys]}"
                    )
                new = StackedLinearHead(
                    pass_,
                    weight=[c.params[f"{name}.weight"] for c in clients],
                    bias=[c.params.get(f"{name}.bias") for c in clients],
                )
            else:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = parents[parent_name]
            swaps.append((parent, attr, module))
            covered.add(name)
            setattr(parent, attr, new)
        for task, c in zip(tasks, clients):
            stray = sorted(k for k in c.params if _split_key(k)[0] not in covered)
            if stray:
                raise BatchedError(
                    f"adapter {task.adapter_name!r} has tensors the batched pass cannot route: {stray[:3]}"
                )
        yield pass_
    finally:
        for parent, attr, original in reversed(swaps):
            setattr(parent, attr, original)


# ------------------------------------------------------------------------------ the batches
def combine(batches: Sequence[Mapping[str, torch.Tensor]], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate client batches along the batch axis, right-padding token axes to the widest.

    Padding is what :class:`fedpeft.data.encoding.Collator` pads with (``pad_token_id`` for input ids, -100
    for LM labels, 0 for masks), so a padded position is masked exactly as in the client's own batch.
    """
    keys = list(batches[0])
    if any(list(b) != keys for b in batches):
        raise BatchedError(f"client batches carry different fields: {[sorted(b) for b in batches]}")
    out = {}
    for key in keys:
        parts = [b[key] for b in batches]
        if parts[0].dim() == 2:
            width = max(p.shape[1] for p in parts)
            fill = {"input_ids": pad_token_id, "labels": -100}.get(key, 0)
            parts = [
                p if p.shape[1] == width else torch.cat([p, p.new_full((p.shape[0], width - p.shape[1]), fill)], dim=1)
                for p in parts
            ]
        out[key] = torch.cat(parts)
    return out


# ------------------------------------------------------------------------------ the pass
def train_batched(
    model: nn.Module, tasks: Sequence[ClientTask], *, pad_token_id: int, device: torch.device | str = "cpu"
) -> list[ClientOutcome]:
    """Train every task for its own ``num_steps`` in lockstep passes over ``model``'s one base.

    ``model`` is a peft model holding every task's adapter (for their configs; their weights are
    not read or changed: a task starts from ``task.adapter``). The model is restored on return.
    Returns one outcome per task, in order.
    """
    if not tasks:
        return []
    device = torch.device(device)
    for t in tasks:
        if t.num_steps < 0:
            raise BatchedError(f"adapter {t.adapter_name!r}: num_steps must be >= 0, got {t.num_steps}")
    clients = [_client_params(model, t, device=device) for t in tasks]
    optimizers = {  # the tasks that train
        k: make_optimizer([p for p in c.params.values() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
        for k, (t, c) in enumerate(zip(tasks, clients))
        if t.num_steps
    }
    streams = [_cycle(t.batches, t.num_steps) for t in tasks]
    taken = [0] * len(tasks)
    total_loss = [0.0] * len(tasks)
    seen = [0] * len(tasks)
    was_training = model.training
    model.train()
    try:
        with stacked_model(model, tasks, clients) as pass_:
            while True:
                active = [k for k, t in enumerate(tasks) if taken[k] < t.num_steps]
                if not active:
                    break
                batches = [to_device(next(streams[k]), device) for k in active]
                pass_.clients, pass_.counts = active, [b["labels"].shape[0] for b in batches]
                batch = combine(batches, pad_token_id=pad_token_id)
                logits = forward_logits(model, batch)
                losses = torch.stack([s.mean() for s in loss_from_logits(logits, batch["labels"]).split(pass_.counts)])
                values = losses.detach().to("cpu", torch.float64).tolist()  # one device sync per pass step
                for k, value in zip(active, values):
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"training loss of adapter {tasks[k].adapter_name!r} (task {k}) became {value} after {seen[k]} examples"
                        )
                for k in active:
                    optimizers[k].zero_grad(set_to_none=True)
                losses.sum().backward()  # Σ_k mean_k: client k's parameters get exactly client k's gradient
                for k, value, n in zip(active, values, pass_.counts):
                    optimizers[k].step()
                    total_loss[k] += value
                    seen[k] += n
                    taken[k] += 1
    finally:
        model.train(was_training)
    return [
        ClientOutcome(
            result=TrainResult(loss=total_loss[k] / max(t.num_steps, 1), num_steps=t.num_steps, num_examples=seen[k]),
            adapter={key: p.detach().to("cpu", copy=True) for key, p in clients[k].params.items()},
        )
        for k, t in enumerate(tasks)
    ]
