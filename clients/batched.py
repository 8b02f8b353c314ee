"""The client's middle step for many jobs at once: train up to ``clients_per_pass`` jobs in one pass.

:func:`fedpeft.clients.job.train_jobs` runs jobs one after the other; :func:`train_jobs_batched` is its
drop-in for an engine that holds several clients' jobs (``engine=batched``): the jobs' decode and
encode steps are the ClientApp's own, only the training of plain-LoRA jobs is shared
(:func:`fedpeft.training.batched.train_batched`, one base copy, one adapter slice per client). Each job's
data order is its own loader with the job's seed, as in :func:`fedpeft.clients.job.run_job`, so a job
gives the adapter it would give alone (docs/methods.md, invariant 12, dropout aside).

Jobs a pass cannot hold run alone through :func:`fedpeft.clients.job.run_job`, the very path of the Ray
engine: DP-SGD jobs (their per-sample clipping, noise and privacy ledger are exactly the Ray
engine's, so ε does not change), evaluate-only jobs and non-LoRA adapters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.clients.job import Job, JobResult, evaluate_metrics, run_job, sync_base, worker_model
from fedpeft.config.schema import round_lr, to_container
from fedpeft.data.encoding import make_loader
from fedpeft.models import adapters as models
from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import Evaluate
from fedpeft.training.batched import ClientTask, train_batched


def passable(job: Job) -> bool:
    """Whether a job can share a pass: it trains a plain LoRA adapter without DP or rank self-pruning
    (whose penalty and decision run on the one-client path, :func:`fedpeft.clients.job.run_job`)."""
    return (
        job.plan.trains
        and job.steps > 0
        and job.plan.rank is not None
        and not job.cfg.client.dp.enabled
        and job.plan.prune is None
    )


def pass_key(job: Job) -> str:
    """Jobs with equal keys share one base: same model, labels, seed, device and base version."""
    base = job.plan.base
    return json.dumps(
        [to_container(job.cfg.model), job.num_labels, job.cfg.seed, job.cfg.device, base.lineage, base.version],
        sort_keys=True,
    )


def passes(jobs: Sequence[Job], *, clients_per_pass: int) -> list[list[int]]:
    """Indices of the passable jobs, grouped by :func:`pass_key` and cut into passes of at most ``clients_per_pass``."""
    if clients_per_pass < 1:
        raise ValueError(f"engine.clients_per_pass must be >= 1, got {clients_per_pass}")
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        if passable(job):
            groups.setdefault(pass_key(job), []).append(i)
    return [idx[s : s + clients_per_pass] for idx in groups.values() for s in range(0, len(idx), clients_per_pass)]


def train_pass(jobs: Sequence[Job]) -> list[JobResult]:
    """Train ``jobs`` (all :func:`passable`, one :func:`pass_key`) in one pass.

    The metrics are those :func:`fedpeft.clients.job.run_job` writes.
    """
    if len({pass_key(j) for j in jobs}) > 1:
        raise ValueError("jobs of one pass must share model, seed and base version")
    cfg = jobs[0].cfg
    cm = worker_model(cfg, jobs[0].num_labels)
    for job in jobs:  # the first brings the shared base to the round's version; the rest find it there
        sync_base(cm, job.store, job.plan, persist=job.persist_base)
    pad_id = models.load_tokenizer(cfg.model).pad_token_id
    metrics: list[dict[str, Any]] = []
    for job in jobs:
        m: dict[str, Any] = {protocol.NUM_EXAMPLES: len(job.train_examples), protocol.RANK: job.plan.rank}
        if job.plan.evaluate == Evaluate.GLOBAL:  # the model the job starts from, as run_job evaluates it
            model = cm.activate(job.plan.rank)
            cm.load_adapter_state(job.plan.rank, job.start)
            m.update(evaluate_metrics(model, job, pad_id, device=cm.device, which=job.plan.evaluate))
        metrics.append(m)
    tasks = []
    for job in jobs:
        cm.activate(job.plan.rank)  # the pass reads each client's adapter config (rank, scaling) from peft
        trains = {role for g in job.plan.groups if g.train for role in g.roles}
        loader = make_loader(
            job.train_examples, pad_token_id=pad_id, batch_size=job.cfg.client.batch_size, shuffle=True, seed=job.seed
        )
        tasks.append(
            ClientTask(
                adapter_name=models.adapter_name(job.plan.rank),
                adapter=job.start,
                batches=loader,
                num_steps=job.steps,
                lr=round_lr(job.cfg.client, job.plan.server_round),
                weight_decay=job.cfg.client.weight_decay,
                frozen=frozenset(k for k in job.start if protocol.key_role(k) not in trains),
            )
        )
    torch.manual_seed(jobs[0].seed)  # dropout of the pass (drawn for the combined batch)
    outcomes = train_batched(cm.model, tasks, pad_token_id=pad_id, device=cm.device)
    results = []
    for job, m, outcome in zip(jobs, metrics, outcomes):
        m.update({protocol.TRAIN_LOSS: outcome.result.loss, protocol.STEPS: outcome.result.num_steps})
        order = cm.adapter_template(job.plan.rank)  # the key order run_job's state has
        state = {k: outcome.adapter[k].to(order[k].dtype) for k in order}
        if job.plan.evaluate == Evaluate.PERSONAL:
            model = cm.activate(job.plan.rank)
            cm.load_adapter_state(job.plan.rank, state)
            m.update(evaluate_metrics(model, job, pad_id, device=cm.device, which=job.plan.evaluate))
        m[protocol.TRAIN_SECONDS] = time.perf_counter() - job.received_at
        results.append(JobResult(state=state, metrics=m))
    return results


def train_jobs_batched(jobs: Sequence[Job], *, clients_per_pass: int) -> list[JobResult]:
    """Every job's result, in order: passable jobs in passes, the others alone (:func:`fedpeft.clients.job.run_job`).

    Raises on the first failure, like :func:`fedpeft.clients.job.train_jobs`; an engine that wants one
    failure per job calls :func:`passes`, :func:`train_pass` and :func:`fedpeft.clients.job.run_job` itself.
    """
    results: list[JobResult | None] = [None] * len(jobs)
    for idx in passes(jobs, clients_per_pass=clients_per_pass):
        for i, r in zip(idx, train_pass([jobs[i] for i in idx])):
            results[i] = r
    for i, job in enumerate(jobs):
        if results[i] is None:
            results[i] = run_job(job)
    return results  # type: ignore[return-value]
