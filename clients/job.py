"""The client in three steps: :func:`decode` a message into a :class:`Job`, :func:`train_jobs`,
:func:`encode` the reply.

* :func:`decode` reads the message's plan (:mod:`fedpeft.protocol.wire`), the node's data and the
  node's kept state, and resolves the adapter the job starts from, tensor by tensor, as the plan
  says (message / seed / zero / node state). Nothing is trained and no model is touched.
* :func:`train_jobs` runs a list of jobs and returns one :class:`JobResult` each. This default
  runs them one after the other on the process's cached model; an engine that trains several
  jobs at once replaces this step and keeps the other two.
* :func:`encode` turns a job and its result into the reply: the uploaded groups, the metrics; the
  groups the plan keeps go to the node's store.

Nothing here knows which aggregation rule the server runs: every decision is in the plan.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Context, Message, MessageType
from torch import nn

from fedpeft.clients.dp import train_local_dp
from fedpeft.clients.node import local_data, node_store, partition_id
from fedpeft.clients.state import NodeStore
from fedpeft.compression.compeft import ComPEFT, codec_from_config, compress_uploads
from fedpeft.config.schema import Config, from_json, round_lr
from fedpeft.data.encoding import collator_for, make_loader
from fedpeft.models import adapters as models
from fedpeft.privacy.accounting import BudgetExhausted, calibrate_noise, epsilon, planned_steps, would_exceed
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.records import State, resize_rank, round_seed, seeded_tensors, stack_to_delta
from fedpeft.protocol.wire import ClientPlan, Evaluate, ProtocolError, RunInfo, Source
from fedpeft.training.local import evaluate, num_local_steps, train_local

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One client's work for one message, fully resolved: what to start from, on what data, for how long."""

    request: Message
    cfg: Config
    run: RunInfo
    partition_id: int
    plan: ClientPlan
    start: State  # the adapter the job starts from, every key resolved from its group's source
    num_labels: int
    train_examples: list
    val_examples: list
    steps: int  # local optimiser steps (0: evaluate only)
    seed: int  # shuffling and dropout of this client in this round
    store: NodeStore | None
    persist_base: bool  # a deployed node keeps its merged base on disk (its process lives for one message)
    received_at: float = field(default_factory=time.perf_counter)

    def node_store(self) -> NodeStore:
        """The node's store, for a plan that needs one (kept groups, error feedback, the DP ledger)."""
        if self.store is None:
            raise ProtocolError("this plan needs the node's store, and this node has none")
        return self.store


@dataclass
class JobResult:
    """What a job produced: the adapter after it, and its metrics (protocol metric keys)."""

    state: State
    metrics: dict[str, Any]


# ------------------------------------------------------------------------------ step 1: decode
def start_state(
    template: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    *,
    plan: ClientPlan,
    kept: Mapping[str, torch.Tensor] | None,
) -> State:
    """The adapter a job starts from, group by group as ``plan`` says.

    ``template`` holds the adapter's keys at the client's rank (shapes and dtypes), ``received``
    the message's tensors, ``kept`` what the node kept from earlier rounds (None: nothing). Raises
    :class:`ProtocolError` for a tensor the plan promises but nobody has, a wrong shape, or a
    tensor sent for no message-sourced group.
    """
    out: State = {}
    for group in plan.groups:
        keys = protocol.keys_with_roles(list(template), group.roles)
        if not keys:
            continue
        source = group.source
        if source == Source.NODE:
            have = [k for k in keys if kept is not None and k in kept]
            if kept is not None and len(have) == len(keys):
                out.update({k: kept[k].clone() for k in keys})
                continue
            if have:
                raise ProtocolError(
                    f"the node keeps {len(have)} of the {len(keys)} tensors of group {sorted(group.roles)}: "
                    "its state is incomplete"
                )
            if group.fallback is None:
                raise ProtocolError(f"group {sorted(group.roles)} comes from the node and has no fallback")
            source = group.fallback
        if source == Source.MESSAGE:
            missing = [k for k in keys if k not in received]
            if missing:
                raise ProtocolError(
                    f"the plan takes {missing[0]!r} from the message, which does not hold it ({len(missing)} missing)"
                )
            out.update({k: received[k].clone() for k in keys})
        elif source == Source.SEED:
            if group.seed is None:
                raise ProtocolError(f"group {sorted(group.roles)} is seeded and has no seed")
            out.update(seeded_tensors(template, keys, seed=group.seed, seed_rank=group.seed_rank))
        elif source == Source.ZERO:
            out.update({k: torch.zeros_like(template[k]) for k in keys})
    unused = sorted(k for k in received if k not in template or not _from_message(plan, k))
    if unused:
        raise ProtocolError(f"the message holds tensors no message-sourced group of this adapter takes: {unused[:3]}")
    for key, tensor in out.items():
        like = template[key]
        if tuple(tensor.shape) != tuple(like.shape):
            raise ProtocolError(
                f"{key}: shape {tuple(tensor.shape)}, this rank-{plan.rank} adapter has {tuple(like.shape)}"
            )
        out[key] = tensor.to(like.dtype)
    return dict(sorted(out.items()))


def _from_message(plan: ClientPlan, key: str) -> bool:
    group = plan.group_of(key)
    return Source.MESSAGE in (group.source, group.fallback)


def decode(msg: Message, context: Context) -> Job:
    """Step 1: a train or evaluate message and the node's context -> a :class:`Job`."""
    evaluate_only = msg.metadata.message_type == MessageType.EVALUATE
    instruction = protocol.decode_instruction(msg.content, evaluate_only=evaluate_only)
    plan, run = instruction.plan, instruction.run
    cfg = from_json(run.config_json)
    torch.set_num_threads(max(1, int(cfg.client.num_cpus)))
    pid = partition_id(context)
    num_labels, train_examples, val_examples = local_data(cfg, pid, context, run)
    if not evaluate_only:
        inject_faults(cfg, pid, plan.server_round, attempt=plan.attempt)
    feedback = cfg.compression.name != "none" and cfg.compression.error_feedback  # the residual lives on the node
    needs_store = (
        plan.base.version > 0
        or ((cfg.client.dp.enabled or feedback) and not evaluate_only)
        or any(g.keep or Source.NODE in (g.source, g.fallback) for g in plan.groups)
    )
    store = node_store(context, run) if needs_store else None
    store_base_updates(store, plan)
    cm = worker_model(cfg, num_labels)
    template = cm.adapter_template(plan.rank)
    uses_node = any(Source.NODE in (g.source, g.fallback) for g in plan.groups)
    kept = store.load_kept(plan.base.lineage) if uses_node and store is not None else None
    steps = 0
    if plan.trains:
        steps = num_local_steps(
            num_examples=len(train_examples),
            batch_size=cfg.client.batch_size,
            local_epochs=cfg.client.local_epochs,
            local_steps=cfg.client.local_steps,
        )
    return Job(
        request=msg,
        cfg=cfg,
        run=run,
        partition_id=pid,
        plan=plan,
        start=start_state(template, instruction.tensors, plan=plan, kept=kept),
        num_labels=num_labels,
        train_examples=train_examples,
        val_examples=val_examples,
        steps=steps,
        seed=round_seed(cfg.seed, plan.server_round) * 1_009 + pid,
        store=store,
        persist_base=protocol.NODE_STATE_DIR in context.node_config,
    )


# ------------------------------------------------------------------------------ step 2: train
def train_jobs(jobs: Sequence[Job]) -> list[JobResult]:
    """Step 2: run every job, one after the other, on this process's cached model."""
    return [run_job(job) for job in jobs]


def run_job(job: Job) -> JobResult:
    """Train (as the plan says) and evaluate one job on the process's cached model.

    The cached model's adapter is a workspace: every tensor is loaded from the job's resolved
    start state and every parameter's ``requires_grad`` set from its group, so nothing of the
    previous job on this worker carries over.
    """
    cfg, plan = job.cfg, job.plan
    cm = worker_model(cfg, job.num_labels)
    sync_base(cm, job.store, plan, persist=job.persist_base)
    model = cm.activate(plan.rank)
    cm.load_adapter_state(plan.rank, job.start)
    cm.set_trainable(plan.rank, {role for g in plan.groups if g.train for role in g.roles})
    pad_id = models.load_tokenizer(cfg.model).pad_token_id
    metrics: dict[str, Any] = {protocol.NUM_EXAMPLES: len(job.train_examples)}
    if plan.rank is not None:
        metrics[protocol.RANK] = plan.rank
    if plan.evaluate == Evaluate.GLOBAL or (plan.evaluate == Evaluate.PERSONAL and not plan.trains):
        metrics.update(evaluate_metrics(model, job, pad_id, device=cm.device, which=plan.evaluate))
    if plan.trains:
        collate = collator_for(cfg, models.load_tokenizer(cfg.model))
        loader = make_loader(
            job.train_examples,
            pad_token_id=pad_id,
            batch_size=cfg.client.batch_size,
            shuffle=True,
            seed=job.seed,
            collate_fn=collate,
        )
        torch.manual_seed(job.seed)  # LoRA dropout
        prune, lr = plan.prune, round_lr(cfg.client, plan.server_round)
        if cfg.client.dp.enabled:
            if prune is not None:
                raise ValueError(
                    "rank self-pruning's penalty is not a per-sample loss: it cannot be trained under DP-SGD"
                )
            result, dp_metrics = dp_train(
                cfg,
                model,
                job.train_examples,
                pad_id,
                job.node_store(),
                pid=job.partition_id,
                steps=job.steps,
                seed=job.seed,
                device=cm.device,
                lr=lr,
            )
            metrics.update(dp_metrics)
        elif prune is None:
            result = train_local(
                model, loader, num_steps=job.steps, lr=lr, weight_decay=cfg.client.weight_decay, device=cm.device
            )
        else:
            if plan.rank is None:
                raise ProtocolError("rank self-pruning needs a LoRA rank")
            factors, tail = lora_factors(model, plan.rank), prune.pruned_rank(plan.rank)
            before = float(tail_norm(factors, tail).detach())
            result = train_local(
                model,
                loader,
                num_steps=job.steps,
                lr=lr,
                weight_decay=cfg.client.weight_decay,
                device=cm.device,
                penalty=lambda: prune.weight * tail_norm(factors, tail),
            )
            after = float(tail_norm(factors, tail).detach())
            metrics.update(
                {
                    protocol.TAIL_NORM_BEFORE: before,
                    protocol.TAIL_NORM_AFTER: after,
                    protocol.RANK: tail if after < before else plan.rank,
                }
            )
            if after < before:  # the tail faded: drop it, so the personal evaluation below sees the pruned model
                with torch.no_grad():
                    for a, b in factors:
                        a[tail:].zero_()
                        b[:, tail:].zero_()
        metrics.update({protocol.TRAIN_LOSS: result.loss, protocol.STEPS: result.num_steps})
        if result.skipped_steps:
            log.warning(
                "partition %s: the float16 loss scaler skipped %d of %d steps (gradients overflowed)",
                job.partition_id,
                result.skipped_steps,
                result.num_steps,
            )
        if plan.evaluate == Evaluate.PERSONAL:
            metrics.update(evaluate_metrics(model, job, pad_id, device=cm.device, which=plan.evaluate))
    metrics[protocol.TRAIN_SECONDS] = time.perf_counter() - job.received_at
    state = cm.adapter_state(plan.rank)
    if (
        plan.rank is not None and metrics.get(protocol.RANK, plan.rank) != plan.rank
    ):  # pruned: its first components, as trained
        state = resize_rank(state, metrics[protocol.RANK])
    return JobResult(state=state, metrics=metrics)


# ------------------------------------------------------------------------------ rank self-pruning
def lora_factors(model: nn.Module, rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) parameters of every LoRA layer of the rank-``rank`` adapter, live (not copies)."""
    name = models.adapter_name(rank)
    params = dict(model.named_parameters())
    a_keys = sorted(k for k in params if k.endswith(f".lora_A.{name}.weight"))
    return [(params[k], params[k.replace(f".lora_A.{name}.", f".lora_B.{name}.")]) for k in a_keys]


def tail_norm(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int) -> torch.Tensor:
    """``Σ_layers ‖B[:, start:]‖_F ‖A[start:, :]‖_F``: the size of the components a pruned client drops."""
    if not factors:
        raise ValueError("rank self-pruning needs LoRA layers; the adapter has none")
    return sum(torch.linalg.norm(b[:, start:]) * torch.linalg.norm(a[start:, :]) for a, b in factors)


def evaluate_metrics(
    model: nn.Module, job: Job, pad_id: int, *, device: torch.device, which: Evaluate
) -> dict[str, Any]:
    """Loss and accuracy on the node's validation slice (nothing when it has none)."""
    if not job.val_examples:
        return {}
    collate = collator_for(job.cfg, models.load_tokenizer(job.cfg.model))
    loader = make_loader(
        job.val_examples,
        pad_token_id=pad_id,
        batch_size=job.cfg.client.eval_batch_size,
        shuffle=False,
        collate_fn=collate,
    )
    val = evaluate(model, loader, device=device)
    return {
        protocol.VAL_LOSS: val.loss,
        protocol.VAL_ACCURACY: val.accuracy,
        protocol.VAL_EXAMPLES: val.num_examples,
        protocol.EVALUATED: 1 if which == Evaluate.GLOBAL else 2,
    }


# ------------------------------------------------------------------------------ step 3: encode
def encode(job: Job, result: JobResult) -> Message:
    """Step 3: the reply to ``job``'s message; the groups the plan keeps are saved on the node first."""
    plan, state = job.plan, result.state
    kept = plan.keys(list(state), keep=True)
    if kept:
        job.node_store().save_kept(plan.base.lineage, {k: state[k] for k in kept})
    metrics = dict(result.metrics)
    if job.request.metadata.message_type == MessageType.EVALUATE:
        return Message(protocol.encode_reply(None, metrics), reply_to=job.request)
    uploads = {k: state[k] for k in plan.keys(list(state), upload=True)}
    codec = codec_from_config(job.cfg.compression)
    if codec is None or not uploads:
        return Message(protocol.encode_reply(uploads, metrics), reply_to=job.request)
    dense, packed = compressed_uploads(job, uploads, codec)
    return Message(protocol.encode_reply(dense, metrics, packed=packed), reply_to=job.request)


def compressed_uploads(job: Job, uploads: State, codec: ComPEFT) -> tuple[State, dict[str, Any]]:
    """(dense, packed) uploads under ComPEFT: the update of each tensor from the start it trained from.

    Applied to the tensors training produced — under DP, already noised — so it is post-processing
    and leaves ε unchanged. With error feedback the node keeps what was dropped and adds it next round.
    """
    feedback = job.cfg.compression.error_feedback
    lineage = job.plan.base.lineage
    residual = job.node_store().load_residual(lineage) if feedback else None
    dense, packed, dropped = compress_uploads(uploads, job.start, job.plan, codec, residual=residual)
    if feedback:
        job.node_store().save_residual(lineage, dropped)
    return dense, packed


# ------------------------------------------------------------------------------ helpers of the steps
def worker_model(cfg: Config, num_labels: int) -> models.CachedModel:
    return models.cached_model(
        cfg.model, num_labels=num_labels, device=models.resolve_device(cfg.device), seed=cfg.seed
    )


def store_base_updates(store: NodeStore | None, plan: ClientPlan) -> None:
    """Save the base updates a message brought: a later process of this node may need them."""
    if not plan.base.updates:
        return
    if store is None:
        raise ProtocolError("the message brings base updates, and this node has no store to keep them")
    for round_, stack in sorted(plan.base.updates.items()):
        store.save_base_update(plan.base.lineage, round_, stack)


def sync_base(cm: models.CachedModel, store: NodeStore | None, plan: ClientPlan, *, persist: bool = False) -> None:
    """Bring the worker's base to the plan's base version; a no-op for rules that never move W.

    The updates the node lacked were saved to its store by :func:`decode`. With ``persist`` (a
    deployed node, whose process lives for one message) the merged base is also kept on the node's
    disk, so the next process restores it instead of replaying every update since round 1.
    """
    base = plan.base
    if base.version == 0:
        if cm.base_version:
            cm.use_base(base.lineage, [], version=0)
        return
    if store is None:
        raise ProtocolError(f"base version {base.version} needs the node's store, and this node has none")
    if persist and (cm.base_lineage != base.lineage or cm.base_version == 0):
        saved = store.load_merged_base(base.lineage)
        if saved is not None and saved[0] <= base.version:
            cm.restore_base(base.lineage, saved[1], version=saved[0])
    start = cm.base_version + 1 if cm.base_lineage == base.lineage and base.version >= cm.base_version else 1
    deltas = []
    for round_ in range(start, base.version + 1):
        stacks = base.updates.get(round_) or store.load_base_update(base.lineage, round_)
        if stacks is None:
            raise ProtocolError(f"base update of round {round_} is neither in the message nor in the node store")
        deltas.append(stack_to_delta(stacks))
    cm.use_base(base.lineage, deltas, version=base.version)
    if persist and deltas:
        store.save_merged_base(base.lineage, base.version, cm.merged_base())


def inject_faults(cfg: Config, pid: int, server_round: int, *, attempt: int) -> None:
    """Raise or hang with the configured probabilities (``faults.*``); seeded, so runs repeat."""
    faults = cfg.faults
    if faults.raise_prob <= 0 and faults.hang_prob <= 0 and faults.crash_prob <= 0:
        return
    draw = random.Random(f"{cfg.seed}-{server_round}-{attempt}-{pid}").random()
    if draw < faults.crash_prob:
        log.error("injected fault: client %d kills its worker process in round %d", pid, server_round)
        os._exit(17)
    draw -= faults.crash_prob
    if draw < faults.raise_prob:
        raise RuntimeError(
            f"injected fault: client {pid} raises in round {server_round} (faults.raise_prob={faults.raise_prob})"
        )
    if draw < faults.raise_prob + faults.hang_prob:
        log.warning("injected fault: client %d hangs for %.0f s in round %d", pid, faults.hang_seconds, server_round)
        time.sleep(faults.hang_seconds)


def dp_noise(cfg: Config, *, num_examples: int, steps: int) -> tuple[float, float]:
    """(noise multiplier, sample rate) of this client: configured, or calibrated once for the whole run."""
    dp = cfg.client.dp
    sample_rate = min(cfg.client.batch_size / num_examples, 1.0)
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier), sample_rate
    total = planned_steps(
        rounds=cfg.num_rounds,
        clients_per_round=cfg.clients_per_round,
        num_clients=cfg.num_clients,
        steps_per_round=steps,
    )
    return calibrate_noise(
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        sample_rate=sample_rate,
        total_steps=total,
        accountant=dp.accountant,
    ), sample_rate


def dp_train(
    cfg: Config,
    model: nn.Module,
    examples: list,
    pad_id: int,
    store: NodeStore,
    *,
    pid: int,
    steps: int,
    seed: int,
    device: torch.device,
    lr: float,
) -> tuple[Any, dict[str, Any]]:
    """A DP-SGD round whose privacy cost is added to the node's persistent ledger."""
    dp = cfg.client.dp
    noise, sample_rate = dp_noise(cfg, num_examples=len(examples), steps=steps)
    ledger = [tuple(x) for x in store.load_json("dp-ledger", [])]
    if dp.target_epsilon is not None and would_exceed(
        ledger, (noise, sample_rate, steps), delta=dp.delta, target_epsilon=dp.target_epsilon, accountant=dp.accountant
    ):
        spent = epsilon(ledger, delta=dp.delta, accountant=dp.accountant)
        after = epsilon([*ledger, (noise, sample_rate, steps)], delta=dp.delta, accountant=dp.accountant)
        raise BudgetExhausted(
            f"privacy budget: client {pid} declines to train: another round would take ε from {spent:.3f} to "
            f"{after:.3f} > target {dp.target_epsilon} (δ={dp.delta})"
        )
    result = train_local_dp(
        model,
        examples,
        collator_for(cfg, models.load_tokenizer(cfg.model)),
        num_steps=steps,
        batch_size=cfg.client.batch_size,
        lr=lr,
        weight_decay=cfg.client.weight_decay,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm,
        seed=seed,
        device=device,
        mode=dp.grad_sample_mode,
    )
    ledger.append((noise, sample_rate, steps))
    store.save_json("dp-ledger", [list(x) for x in ledger])
    eps = epsilon(ledger, delta=dp.delta, accountant=dp.accountant)
    return result, {
        protocol.EPSILON: eps,
        protocol.NOISE_MULTIPLIER: noise,
        protocol.SAMPLE_RATE: sample_rate,
        protocol.DP_STEPS: steps,
        protocol.DP_ROUNDS: len(ledger),
    }
