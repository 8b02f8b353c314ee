"""The fedpeft ClientApp: local LoRA training on one node's data, driven by the server's messages.

This module must be imported, never run as ``__main__``: Ray pickles a ClientApp defined in
``__main__`` by value, which would drop the per-process caches below and reload the base model
for every client (a GPU round took 36 s instead of 15 s that way).

Per process (a Ray worker in simulation, a ``flwr-clientapp`` process in deployment) the base
model, tokenizer and encoded data are loaded once and reused; a message only swaps adapters.

Messages and their instructions (the ``config`` ConfigRecord):

* ``query``: the handshake. Replies with the node's ``partition-id``, ``rank``, ``num-examples`` and
  ``label-counts`` (its training labels), and its ``tier`` if it has one (``node-info``).
* ``train``: ``fedpeft-config`` (the run's config as JSON), ``rank``, ``max-rank``,
  ``server-round`` and how to start the adapter: tensors in the ``arrays`` record are loaded;
  LoRA A missing from them is drawn from ``a-seed`` (bit-identical on every node); B missing
  from them is zero (``lora-init: fresh``). ``train-a: False`` freezes A; ``upload: no-a`` keeps
  A off the uplink. ``base-version`` asks for the base with that many server updates merged in;
  the updates the node has not seen come in the ``base-updates`` record.

Nothing here knows which aggregation rule the server runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import data as fdata
from fedpeft import models
from fedpeft.config import Config, from_json, to_container
from fedpeft.records import LORA_A_SUFFIX, LORA_B_SUFFIX, State, from_record, resize_rank, seeded_lora_a, stack_to_delta, to_record
from fedpeft.training import evaluate, num_local_steps, train_local
from clients.dp import BudgetExhausted, calibrate_noise, epsilon, planned_steps, train_local_dp, would_exceed
from clients.state import NodeStore

log = logging.getLogger(__name__)

app = ClientApp()

_ENCODED: dict[str, tuple[int, list, list]] = {}


# ------------------------------------------------------------------------------ node setup
def node_rank(cfg: Config, partition_id: int, node_config: dict[str, Any]) -> int:
    """This node's LoRA rank: its own node config (``rank``, or ``tier`` looked up in ``strategy.tiers``) wins,
    else the run config's rank for its partition (``strategy.ranks`` / ``client_tiers`` / ``model.lora.r``)."""
    if "rank" in node_config:
        return int(node_config["rank"])
    if "tier" in node_config:
        tiers = cfg.strategy.tiers or {}
        if str(node_config["tier"]) not in tiers:
            raise ValueError(f"node tier {node_config['tier']!r} is not in strategy.tiers {sorted(tiers)}")
        return int(tiers[str(node_config["tier"])])
    return models.client_ranks(cfg)[partition_id]


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id': start the SuperNode with --node-config \"partition-id=<k> ...\"")
    return int(context.node_config["partition-id"])


def node_store(cfg: Config, context: Context, instructions: ConfigRecord) -> NodeStore:
    """The node's persistent folder: ``state-dir`` from the node config, else the run's node folder."""
    root = context.node_config.get("state-dir") or instructions.get("sim-state-dir")
    if not root:
        raise ValueError("no node state folder: start the SuperNode with --node-config \"state-dir='<folder>' ...\" (FLoRA's base and the DP ledger live there)")
    return NodeStore(Path(str(root)) / f"node-{partition_id(context)}")


def setup(msg: Message) -> Config:
    cfg = from_json(str(msg.content["config"]["fedpeft-config"]))
    torch.set_num_threads(max(1, int(cfg.client.num_cpus)))
    return cfg


def local_data(cfg: Config, pid: int, context: Context, instructions: ConfigRecord) -> tuple[int, list, list]:
    """(number of labels, encoded train examples, encoded validation examples) of this node.

    A node whose node config names a ``data-path`` trains on that file or folder (deployment:
    the data never leaves the node); otherwise on partition ``pid`` of the run's data (simulation
    and demos). Cached per process, and on a node with a ``state-dir`` also on its disk: a
    deployed ``flwr-clientapp`` process lives for one message, and reading, splitting and
    tokenising the corpus again each time would cost more than loading the model.
    """
    need_labels = cfg.model.task == "seq_cls"
    path = context.node_config.get("data-path")
    names = [str(n) for n in instructions.get("label-names", [])]
    if path:
        if need_labels and not names:
            raise ValueError("the server sent no 'label-names'; a node with its own data-path needs them to number its labels")
        source = Path(str(path)).expanduser()
        files = sorted(f for f in source.rglob("*") if f.is_file()) if source.is_dir() else [source] if source.exists() else []
        stamp = [[str(f), f.stat().st_mtime_ns, f.stat().st_size] for f in files]  # an edited file invalidates the cache
        key = json.dumps(["path", str(source), stamp, names, cfg.seed, pid, to_container(cfg.data), to_container(cfg.model)], sort_keys=True)
    else:
        key = json.dumps(["partition", cfg.seed, cfg.num_clients, pid, to_container(cfg.data), to_container(cfg.model)], sort_keys=True)
    if key in _ENCODED:
        return _ENCODED[key]
    disk = NodeStore(Path(str(context.node_config["state-dir"])) / f"node-{pid}") if "state-dir" in context.node_config else None
    disk_key = "data-" + hashlib.sha256(key.encode()).hexdigest()[:20]
    cached = disk.load_cached(disk_key) if disk is not None else None
    if cached is not None:
        _ENCODED[key] = (int(cached["num-labels"]), cached["train"], cached["val"])
        return _ENCODED[key]
    if path:
        train_ds, val_ds = fdata.node_data(cfg.data, str(path), label_names=names, seed=cfg.seed, node=pid, need_labels=need_labels)
        num_labels = len(names)
    else:
        data = fdata.prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=need_labels)
        (train_ds, val_ds), num_labels = data.client_split(pid), data.num_labels
    _ENCODED[key] = (num_labels, *encode_split(cfg, train_ds, val_ds))
    if disk is not None:
        disk.save_cached(disk_key, {"num-labels": num_labels, "train": _ENCODED[key][1], "val": _ENCODED[key][2]})
    return _ENCODED[key]


def encode_split(cfg: Config, train_ds, val_ds) -> tuple[list, list]:
    tokenizer = models.load_tokenizer(cfg.model)
    encode = functools.partial(fdata.encode, tokenizer=tokenizer, max_length=cfg.model.max_length, task=cfg.model.task)
    return encode(train_ds), encode(val_ds)


def worker_model(cfg: Config, num_labels: int) -> models.CachedModel:
    return models.cached_model(cfg.model, num_labels=num_labels, device=models.resolve_device(cfg.device), seed=cfg.seed)


# ------------------------------------------------------------------------------ the adapter
def starting_state(current: State, received: State, instructions: ConfigRecord, *, rank: int) -> State:
    """The adapter a round starts from, key by key: received, else seeded A, else zero B (fresh)."""
    out: State = {}
    seeded: State | None = None
    fresh = instructions.get("lora-init", "load") == "fresh"
    for key, tensor in current.items():
        if key in received:
            out[key] = received[key]
        elif key.endswith(LORA_A_SUFFIX) and "a-seed" in instructions:
            if seeded is None:
                max_rank = int(instructions.get("max-rank", rank))
                seeded = resize_rank(seeded_lora_a(resize_rank(current, max_rank), seed=int(instructions["a-seed"])), rank)
            out[key] = seeded[key]
        elif key.endswith(LORA_B_SUFFIX) and fresh:
            out[key] = torch.zeros_like(tensor)
        else:
            raise ValueError(f"the server sent no value for {key!r} and no rule to initialise it")
    extra = sorted(set(received) - set(current))
    if extra:
        raise ValueError(f"the server sent tensors this rank-{rank} adapter does not have: {extra[:3]}")
    return out


def sync_base(cm: models.CachedModel, store: NodeStore | None, msg: Message, instructions: ConfigRecord, *, persist: bool = False) -> None:
    """Bring the worker's base to ``base-version`` (FLoRA); a no-op for rules that never move W.

    With ``persist`` (a deployed node, whose process lives for one message) the merged base is
    also kept on the node's disk, so the next process restores it instead of replaying every
    update since round 1.
    """
    version = int(instructions.get("base-version", 0))
    lineage = str(instructions.get("base-lineage", ""))
    if version == 0:
        if cm.base_version:
            cm.use_base(lineage, [], version=0)
        return
    received: dict[int, dict[str, torch.Tensor]] = {}
    if "base-updates" in msg.content.array_records:
        for key, tensor in from_record(msg.content.array_records["base-updates"]).items():
            round_, name = key.split("|", 1)
            received.setdefault(int(round_), {})[name] = tensor
    for round_, tensors in sorted(received.items()):
        store.save_base_update(lineage, round_, tensors)
    if persist and (cm.base_lineage != lineage or cm.base_version == 0):
        saved = store.load_merged_base(lineage)
        if saved is not None and saved[0] <= version:
            cm.restore_base(lineage, saved[1], version=saved[0])
    start = cm.base_version + 1 if cm.base_lineage == lineage and version >= cm.base_version else 1
    deltas = []
    for round_ in range(start, version + 1):
        stacks = received.get(round_) or store.load_base_update(lineage, round_)
        if stacks is None:
            raise ValueError(f"base update of round {round_} is neither in the message nor in the node store")
        deltas.append(stack_to_delta(stacks))
    cm.use_base(lineage, deltas, version=version)
    if persist and deltas:
        store.save_merged_base(lineage, version, cm.merged_base())


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
        raise RuntimeError(f"injected fault: client {pid} raises in round {server_round} (faults.raise_prob={faults.raise_prob})")
    if draw < faults.raise_prob + faults.hang_prob:
        log.warning("injected fault: client %d hangs for %.0f s in round %d", pid, faults.hang_seconds, server_round)
        time.sleep(faults.hang_seconds)


def dp_noise(cfg: Config, *, num_examples: int, steps: int) -> tuple[float, float]:
    """(noise multiplier, sample rate) of this client: configured, or calibrated once for the whole run."""
    dp = cfg.client.dp
    sample_rate = min(cfg.client.batch_size / num_examples, 1.0)
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier), sample_rate
    total = planned_steps(rounds=cfg.num_rounds, clients_per_round=cfg.clients_per_round, num_clients=cfg.num_clients, steps_per_round=steps)
    return calibrate_noise(target_epsilon=dp.target_epsilon, delta=dp.delta, sample_rate=sample_rate, total_steps=total, accountant=dp.accountant), sample_rate


def dp_train(cfg: Config, model, examples: list, pad_id: int, store: NodeStore, *, pid: int, steps: int, seed: int, device) -> tuple[Any, dict[str, Any]]:
    """A DP-SGD round whose privacy cost is added to the node's persistent ledger."""
    dp = cfg.client.dp
    noise, sample_rate = dp_noise(cfg, num_examples=len(examples), steps=steps)
    ledger = [tuple(x) for x in store.load_json("dp-ledger", [])]
    spent = epsilon(ledger, delta=dp.delta, accountant=dp.accountant)
    if dp.target_epsilon is not None and would_exceed(ledger, (noise, sample_rate, steps), delta=dp.delta, target_epsilon=dp.target_epsilon, accountant=dp.accountant):
        after = epsilon([*ledger, (noise, sample_rate, steps)], delta=dp.delta, accountant=dp.accountant)
        raise BudgetExhausted(
            f"privacy budget: client {pid} declines to train: another round would take ε from {spent:.3f} to {after:.3f} > target {dp.target_epsilon} (δ={dp.delta})"
        )
    result = train_local_dp(
        model,
        examples,
        fdata.Collator(pad_id),
        num_steps=steps,
        batch_size=cfg.client.batch_size,
        lr=cfg.client.lr,
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
    return result, {"epsilon": eps, "noise-multiplier": noise, "sample-rate": sample_rate, "dp-steps": steps, "dp-rounds": len(ledger)}


# ------------------------------------------------------------------------------ handlers
@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: which partition, rank and how many training examples this node has."""
    cfg = setup(msg)
    pid = partition_id(context)
    num_labels, train_examples, _ = local_data(cfg, pid, context, msg.content["config"])
    metrics = MetricRecord({"partition-id": pid, "rank": node_rank(cfg, pid, context.node_config), "num-examples": len(train_examples)})
    content = RecordDict({"metrics": metrics})
    # For the server's node status table: the labels this node trains on, and its tier if it has one
    if cfg.model.task == "seq_cls":
        metrics["label-counts"] = fdata.label_counts([e["labels"] for e in train_examples], num_labels)
    tier = context.node_config.get("tier") or (cfg.strategy.client_tiers[pid] if cfg.strategy.client_tiers and not cfg.strategy.ranks else None)
    if tier:
        content["node-info"] = ConfigRecord({"tier": str(tier)})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the adapter the server described."""
    started = time.perf_counter()
    cfg = setup(msg)
    instructions = msg.content["config"]
    pid = partition_id(context)
    rank = int(instructions["rank"])
    server_round = int(instructions["server-round"])
    num_labels, train_examples, val_examples = local_data(cfg, pid, context, instructions)
    inject_faults(cfg, pid, server_round, attempt=int(instructions.get("attempt", 0)))

    cm = worker_model(cfg, num_labels)
    needs_store = int(instructions.get("base-version", 0)) or cfg.client.dp.enabled
    store = node_store(cfg, context, instructions) if needs_store else None
    sync_base(cm, store, msg, instructions, persist="state-dir" in context.node_config)
    model = cm.activate(rank)
    received = from_record(msg.content["arrays"]) if "arrays" in msg.content.array_records else {}
    cm.load_adapter_state(rank, starting_state(cm.adapter_state(rank), received, instructions, rank=rank))
    train_a = bool(instructions.get("train-a", True))
    for name, param in model.named_parameters():
        if ".lora_A." in name and f".{models.adapter_name(rank)}." in name:
            param.requires_grad_(train_a)

    pad_id = models.load_tokenizer(cfg.model).pad_token_id
    shuffle_seed = (cfg.seed * 1_000_003 + server_round) * 1_009 + pid
    loader = fdata.make_loader(train_examples, pad_token_id=pad_id, batch_size=cfg.client.batch_size, shuffle=True, seed=shuffle_seed)
    steps = num_local_steps(
        num_examples=len(train_examples), batch_size=cfg.client.batch_size, local_epochs=cfg.client.local_epochs, local_steps=cfg.client.local_steps
    )
    torch.manual_seed(shuffle_seed)  # LoRA dropout
    dp_metrics: dict[str, Any] = {}
    if cfg.client.dp.enabled:
        result, dp_metrics = dp_train(cfg, model, train_examples, pad_id, store, pid=pid, steps=steps, seed=shuffle_seed, device=cm.device)
    else:
        result = train_local(model, loader, num_steps=steps, lr=cfg.client.lr, weight_decay=cfg.client.weight_decay, device=cm.device)

    metrics: dict[str, Any] = {
        **dp_metrics,
        "num-examples": len(train_examples),
        "rank": rank,
        "train-loss": result.loss,
        "steps": result.num_steps,
        "train-seconds": time.perf_counter() - started,
        "base-loads": models.BASE_MODEL_LOADS,
        "worker-pid": os.getpid(),
    }
    if val_examples:
        val = evaluate(model, fdata.make_loader(val_examples, pad_token_id=pad_id, batch_size=cfg.client.eval_batch_size, shuffle=False), device=cm.device)
        metrics.update({"val-loss": val.loss, "val-accuracy": val.accuracy})
    state = cm.adapter_state(rank)
    # A fingerprint of this client's A, so a run can show FFA-LoRA's A never changed anywhere.
    metrics["lora-a-crc32"] = zlib.crc32(b"".join(state[k].numpy().tobytes() for k in sorted(state) if k.endswith(LORA_A_SUFFIX)))
    if instructions.get("upload", "all") == "no-a":
        state = {k: v for k, v in state.items() if not k.endswith(LORA_A_SUFFIX)}
    content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this node's validation slice."""
    cfg = setup(msg)
    instructions = msg.content["config"]
    pid = partition_id(context)
    rank = int(instructions["rank"])
    num_labels, _, val_examples = local_data(cfg, pid, context, instructions)
    cm = worker_model(cfg, num_labels)
    model = cm.activate(rank)
    received = from_record(msg.content["arrays"])
    cm.load_adapter_state(rank, starting_state(cm.adapter_state(rank), received, instructions, rank=rank))
    pad_id = models.load_tokenizer(cfg.model).pad_token_id
    val = evaluate(model, fdata.make_loader(val_examples, pad_token_id=pad_id, batch_size=cfg.client.eval_batch_size, shuffle=False), device=cm.device)
    metrics = MetricRecord({"num-examples": max(val.num_examples, 1), "val-loss": val.loss if val.num_examples else 0.0, "val-accuracy": val.accuracy if val.num_examples else 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
