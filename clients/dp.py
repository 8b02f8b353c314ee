"""Client-side DP-SGD for LoRA: Poisson-sampled batches, per-sample clipping and Gaussian noise.

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

What the steps spend (the noise a target ε calls for, the ε spent, the budget across rounds) is
:mod:`fedpeft.privacy.accounting`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedpeft.privacy.accounting import DPError, check_dp_args
from fedpeft.training.local import TrainResult, make_optimizer, per_sample_loss, to_device, trainable_parameters

MODES = ("lora", "opacus", "loop")  # client.dp.grad_sample_mode: how the per-sample gradients are computed


# ------------------------------------------------------------------------------ sampling
def poisson_batches(n: int, *, sample_rate: float, num_steps: int, generator: torch.Generator) -> list[list[int]]:
    """``num_steps`` Poisson-sampled index lists: each example is in each batch with probability q."""
    return [
        torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist() for _ in range(num_steps)
    ]


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
                raise DPError(
                    f"mode='lora' handles trainable nn.Linear layers only, found a trainable {type(module).__name__}; "
                    "use client.dp.grad_sample_mode=loop (any peft method)"
                )
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
            raise DPError(
                f"no per-sample gradient for {len(missing)} trainable parameter(s); are they used in the forward?"
            )
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
            torch.stack([g if g is not None else torch.zeros_like(p) for g in (ex[j] for ex in per_example)])
            for j, p in enumerate(self.params)
        ]

    def grad_samples(self) -> list[torch.Tensor]:
        out, self._samples = self._samples, []
        return out

    def remove(self) -> None:
        self._samples = []


def clip_and_noise(
    grad_samples: Sequence[torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """DP-SGD's update from per-sample gradients, exactly as Opacus' DPOptimizer computes it."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    out = []
    for g in grad_samples:
        summed = torch.einsum("i,i...", factor.to(g.dtype), g)
        if std > 0:  # Opacus draws nothing for std 0, so neither do we: the generators stay in step
            summed = summed + torch.normal(
                mean=0.0, std=std, size=summed.shape, device=summed.device, generator=generator, dtype=summed.dtype
            )
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
    plan = (
        list(batches)
        if batches is not None
        else poisson_batches(n, sample_rate=sample_rate, num_steps=num_steps, generator=sampling)
    )
    expected = sample_rate * n
    model.train()
    if mode == "opacus":
        return _train_opacus(
            model,
            dataset,
            collate_fn,
            plan,
            lr=lr,
            weight_decay=weight_decay,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected=expected,
            generator=noise_gen,
            device=device,
        )
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
            if isinstance(sampler, LoopGradSampler):  # mode == "loop"
                sampler.collect(batch)
            else:
                losses.sum().backward()
            grads = clip_and_noise(
                sampler.grad_samples(),
                max_grad_norm=max_grad_norm,
                noise_multiplier=noise_multiplier,
                expected_batch_size=expected,
                generator=noise_gen,
            )
            for p, g in zip(params, grads):
                p.grad = g.view_as(p).to(p.dtype)
            optimizer.step()
            total += losses.mean().item()
            seen += len(indices)
            used += 1
    finally:
        sampler.remove()
    return TrainResult(loss=total / max(used, 1), num_steps=len(plan), num_examples=seen)


def _train_opacus(
    model: nn.Module,
    dataset: Sequence[dict[str, Any]],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    plan: Sequence[Sequence[int]],
    *,
    lr: float,
    weight_decay: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected: float,
    generator: torch.Generator,
    device: torch.device | str,
) -> TrainResult:
    """The reference path: Opacus GradSampleModule (hooks) + DPOptimizer, adapter keys untouched."""
    from opacus import GradSampleModule  # start-up: opacus only when this path runs (see fedpeft.privacy.accounting)
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
