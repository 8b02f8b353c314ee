"""Client-side DP-SGD for LoRA: per-sample clipping, Gaussian noise, and accounting across rounds.

Two per-sample gradient paths give the same clipped and noised update:

* ``mode="opacus"`` — the reference: Opacus' ``GradSampleModule`` (hooks) and ``DPOptimizer``.
* ``mode="loop"`` — any peft method (IA3 vectors, prompt embeddings, DoRA magnitudes): one
  backward per example gives its exact gradient; slow, but no layer type needs a rule.
* ``mode="lora"`` — fedpeft's own path for LoRA. Every trainable parameter of a LoRA model lives in
  an ``nn.Linear`` (``lora_A``, ``lora_B``, a linear head), whose per-sample gradient is
  ``Σ_t g_t x_tᵀ`` from the layer's input ``x`` and output gradient ``g``: one einsum per layer,
  hooked only on those layers, then clipping and noise with fused ops. Anything else that trains
  raises and points to ``mode="opacus"``.

Both follow Opacus' DPOptimizer exactly: per-sample norm over all parameters, clip factor
``min(1, C / (‖g_i‖ + 1e-6))``, noise ``N(0, (σC)²)`` drawn per parameter in parameter order from one
generator, division by the expected batch size ``q·N`` (Poisson sampling). Empty Poisson batches
are skipped before the forward (they still count as steps for the accountant).

The privacy ledger is a list of ``(noise_multiplier, sample_rate, steps)`` — what Opacus'
accountants call ``history`` — kept in the node's state across rounds, so ε composes over every
round the client took part in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedpeft.training.local import TrainResult, make_optimizer, per_sample_loss, to_device, trainable_parameters

Ledger = list[tuple[float, float, int]]
MODES = ("lora", "opacus", "loop")


class DPError(ValueError):
    """A DP setting that cannot work (unreachable ε, bad δ, ...); the message says what can."""


class BudgetExhausted(RuntimeError):
    """Another round would push this client past its privacy budget."""


# ------------------------------------------------------------------------------ accounting
def compact(ledger: Sequence[Sequence[float]]) -> Ledger:
    """The ledger with consecutive entries of equal noise and sample rate merged, steps summed:
    the history Opacus' accountants keep when stepped one step at a time (``RDPAccountant.step``)."""
    out: Ledger = []
    for s, q, n in ledger:
        if out and out[-1][:2] == (float(s), float(q)):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return out


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> Any:
    """One step's RDP at every order of Opacus' RDP accountant (the costly part of its ε, ~0.1 s)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = privacy_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False  # shared by every caller
    return rdp


def epsilon(ledger: Sequence[Sequence[float]], *, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after every step in ``ledger``, from Opacus' own accountant.

    With the RDP accountant this is ``RDPAccountant.get_epsilon`` over the compacted ledger, each
    entry's per-step RDP computed once per process: ``compute_rdp(steps=n)`` is that vector times
    ``n``, so the result is Opacus' to the last bit, while a client's accounting no longer costs
    ~0.1 s per round it has taken part in, every round.
    """
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    if not ledger:
        return 0.0
    history = compact(ledger)
    if accountant != "rdp":
        acc = create_accountant(mechanism=accountant)
        acc.history = history
        return float(acc.get_epsilon(delta=delta))
    rdp = sum([_rdp_per_step(s, q) * n for s, q, n in history])
    eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def check_dp_args(*, target_epsilon: float | None, delta: float, sample_rate: float) -> None:
    if target_epsilon is not None and target_epsilon <= 0:
        raise DPError(f"client.dp.target_epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < delta < 1.0:
        raise DPError(f"client.dp.delta must be in (0, 1), got {delta}")
    if not 0.0 < sample_rate <= 1.0:
        raise DPError(f"sample rate batch_size / examples must be in (0, 1], got {sample_rate}")


MAX_NOISE = 1e3


@functools.lru_cache(maxsize=256)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``total_steps`` steps.

    Raises :class:`DPError` with the smallest reachable ε (at noise ``MAX_NOISE``) when the target
    is below it. A pure function of its arguments, so each process computes it once per client
    (Opacus' search takes 1-2 s), not once per client and round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_dp_args(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate)
    floor = epsilon([(MAX_NOISE, sample_rate, total_steps)], delta=delta, accountant=accountant)
    if target_epsilon <= floor:
        raise DPError(
            f"target ε={target_epsilon} at δ={delta} is unreachable for {total_steps} steps at sample rate {sample_rate:.4g}: "
            f"the smallest reachable ε is {floor:.4g} (noise multiplier {MAX_NOISE:g}); raise the target or δ, or train fewer steps"
        )
    return float(
        get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=total_steps, accountant=accountant, epsilon_tolerance=0.001)
    )


def would_exceed(ledger: Ledger, step: tuple[float, float, int], *, delta: float, target_epsilon: float, accountant: str = "rdp") -> bool:
    """Whether one more round ``step`` = (noise, q, steps) would push ε past ``target_epsilon``."""
    return epsilon([*ledger, step], delta=delta, accountant=accountant) > target_epsilon * (1 + 1e-9)


# ------------------------------------------------------------------------------ sampling
def poisson_batches(n: int, *, sample_rate: float, num_steps: int, generator: torch.Generator) -> list[list[int]]:
    """``num_steps`` Poisson-sampled index lists: each example is in each batch with probability q."""
    return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist() for _ in range(num_steps)]


# ------------------------------------------------------------------------------ per-sample gradients
class LinearGradSampler:
    """Per-sample gradients of every trainable ``nn.Linear`` from its input and output gradient.

    After a backward of the *summed* per-sample loss, ``grad_samples()`` returns, for each
    trainable parameter in ``params`` order, a tensor of shape ``(batch, *param.shape)``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = trainable_parameters(model)
        owners = {}
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, nn.Linear):
                raise DPError(f"mode='lora' handles trainable nn.Linear layers only, found a trainable {type(module).__name__}; use client.dp.grad_sample_mode=loop (any peft method)")
            owners[module] = own
        self.layers = list(owners)
        self._samples: dict[int, torch.Tensor] = {}
        # A forward hook hangs a gradient hook on each output: cheaper than a module backward hook
        # (no wrapping of inputs and outputs), and a layer used twice gets one hook per use.
        self._handles = [layer.register_forward_hook(self._on_forward) for layer in self.layers]

    def _on_forward(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._per_sample(module, x, grad))

    def _per_sample(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        # In the weight's dtype: under model.autocast the layer's output (so its gradient) is bf16
        # while its input may not be; the per-sample gradients, their norms, the clipping and the
        # noise are then all float32, like the weights they update.
        g, x = grad.detach().to(module.weight.dtype), x.to(module.weight.dtype)
        if x.dim() == 2:  # (batch, d): one token per sample
            x, g = x.unsqueeze(1), g.unsqueeze(1)
        x, g = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        if module.weight.requires_grad:
            self._add(module.weight, torch.einsum("nto,nti->noi", g, x))
        if module.bias is not None and module.bias.requires_grad:
            self._add(module.bias, g.sum(dim=1))

    def _add(self, param: nn.Parameter, sample: torch.Tensor) -> None:
        key = id(param)  # a module used twice in one forward accumulates
        self._samples[key] = sample if key not in self._samples else self._samples[key] + sample

    def grad_samples(self) -> list[torch.Tensor]:
        missing = [i for i, p in enumerate(self.params) if id(p) not in self._samples]
        if missing:
            raise DPError(f"no per-sample gradient for {len(missing)} trainable parameter(s); are they used in the forward?")
        out = [self._samples[id(p)] for p in self.params]
        self._samples.clear()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._samples.clear()


class LoopGradSampler:
    """Per-sample gradients of any trainable parameters: one forward and backward per example.

    Exact for every module type (the gradient of example i's own loss); costs one backward per
    example, so it is the path for peft methods the Linear-only sampler cannot serve.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        self.model, self.params = model, list(params)
        self._samples: list[torch.Tensor] = []

    def collect(self, batch: dict[str, torch.Tensor]) -> None:
        """Per-sample gradients of ``batch`` (a padded batch: each row keeps its own attention mask)."""
        rows = batch["input_ids"].shape[0]
        per_example: list[tuple[torch.Tensor, ...]] = []
        for i in range(rows):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            loss = per_sample_loss(self.model, one).sum()
            per_example.append(torch.autograd.grad(loss, self.params, allow_unused=True))
        self._samples = [
            torch.stack([g if g is not None else torch.zeros_like(p) for g in (ex[j] for ex in per_example)]) for j, p in enumerate(self.params)
        ]

    def grad_samples(self) -> list[torch.Tensor]:
        out, self._samples = self._samples, []
        return out

    def remove(self) -> None:
        self._samples = []


def clip_and_noise(
    grad_samples: Sequence[torch.Tensor], *, max_grad_norm: float, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """DP-SGD's update from per-sample gradients, exactly as Opacus' DPOptimizer computes it."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    out = []
    for g in grad_samples:
        summed = torch.einsum("i,i...", factor.to(g.dtype), g)
        if std > 0:  # Opacus draws nothing for std 0, so neither do we: the generators stay in step
            summed = summed + torch.normal(mean=0.0, std=std, size=summed.shape, device=summed.device, generator=generator, dtype=summed.dtype)
        out.append(summed / expected_batch_size)
    return out


# ------------------------------------------------------------------------------ training
def train_local_dp(
    model: nn.Module,
    dataset: Sequence[dict[str, Any]],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    num_steps: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    mode: str = "lora",
    batches: Sequence[Sequence[int]] | None = None,
) -> TrainResult:
    """``num_steps`` DP-SGD steps (AdamW on the privatised gradient) on the trainable parameters.

    Batches are Poisson-sampled with rate ``batch_size / len(dataset)`` from ``seed`` unless
    ``batches`` (lists of indices) are given, e.g. to compare with a plain run on the same batches.
    Noise is drawn from a generator seeded by ``seed`` as well.
    """
    if mode not in MODES:
        raise DPError(f"client.dp.grad_sample_mode must be one of {MODES}, got {mode!r}")
    n = len(dataset)
    sample_rate = batch_size / n
    check_dp_args(target_epsilon=None, delta=0.5, sample_rate=min(sample_rate, 1.0))
    sampling = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=torch.device(device)).manual_seed(seed + 1)
    plan = list(batches) if batches is not None else poisson_batches(n, sample_rate=sample_rate, num_steps=num_steps, generator=sampling)
    expected = sample_rate * n
    model.train()
    if mode == "opacus":
        return _train_opacus(model, dataset, collate_fn, plan, lr=lr, weight_decay=weight_decay, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected=expected, generator=noise_gen, device=device)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, lr=lr, weight_decay=weight_decay)
    sampler = LoopGradSampler(model, params) if mode == "loop" else LinearGradSampler(model)
    total, seen, used = 0.0, 0, 0
    try:
        for indices in plan:
            if not indices:  # an empty Poisson batch: no forward, but still a step of the mechanism
                continue
            batch = to_device(collate_fn([dataset[i] for i in indices]), device)
            losses = per_sample_loss(model, batch)
            if not torch.isfinite(losses).all():
                raise FloatingPointError("DP training loss became non-finite")
            optimizer.zero_grad(set_to_none=True)
            if mode == "loop":
                sampler.collect(batch)
            else:
                losses.sum().backward()
            grads = clip_and_noise(sampler.grad_samples(), max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, expected_batch_size=expected, generator=noise_gen)
            for p, g in zip(params, grads):
                p.grad = g.view_as(p).to(p.dtype)
            optimizer.step()
            total += losses.mean().item()
            seen += len(indices)
            used += 1
    finally:
        sampler.remove()
    return TrainResult(loss=total / max(used, 1), num_steps=len(plan), num_examples=seen)


def _train_opacus(model, dataset, collate_fn, plan, *, lr, weight_decay, noise_multiplier, max_grad_norm, expected, generator, device) -> TrainResult:
    """The reference path: Opacus GradSampleModule (hooks) + DPOptimizer, adapter keys untouched."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    params = trainable_parameters(model)
    optimizer = DPOptimizer(
        make_optimizer(params, lr=lr, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=int(round(expected)) if abs(expected - round(expected)) < 1e-9 else expected,
        loss_reduction="mean",
        generator=generator,
    )
    total, seen, used = 0.0, 0, 0
    try:
        for indices in plan:
            if not indices:
                continue
            batch = to_device(collate_fn([dataset[i] for i in indices]), device)
            losses = per_sample_loss(gsm, batch)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.mean().item()
            seen += len(indices)
            used += 1
    finally:
        gsm._close()  # removes hooks and grad_sample attributes; the wrapped model's keys are unchanged
    return TrainResult(loss=total / max(used, 1), num_steps=len(plan), num_examples=seen)


def planned_steps(*, rounds: int, clients_per_round: int, num_clients: int, steps_per_round: int) -> int:
    """Steps a client expects over the whole run: expected participations × steps per round."""
    return math.ceil(rounds * clients_per_round / num_clients) * steps_per_round
