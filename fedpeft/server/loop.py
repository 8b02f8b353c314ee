"""The server side of a run: handshake, rounds, evaluation on the held-out test split, results.

:func:`run_federated` drives any :class:`strategies.LoRAStrategy` over a Flower ``Grid`` (the
simulation engine's or a SuperLink's). Flower's ``Strategy.start`` is not used: it always begins
at round 1, samples with an unseeded ``random.sample`` and has no place for a handshake or a
communication budget. :func:`run_centralized` is the non-federated reference on pooled data.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedpeft.data.encoding import collator_for, encode_config, make_loader
from fedpeft.data.partition import FederatedData, prepare
from fedpeft.models import adapters as models
from fedpeft.config.schema import Config, evaluates, round_lr, to_json
from fedpeft.protocol import wire as protocol
from fedpeft.evaluation.llm import LLMEvaluator
from fedpeft.protocol.records import State, fresh_lora, round_seed, split_state, stack_to_delta
from fedpeft.models.adapters import client_ranks
from fedpeft.reporting.metrics import MetricsWriter, weighted_spread
from fedpeft.reporting.status import node_row, write_node_status
from fedpeft.training.local import EvalResult, evaluate, num_local_steps, train_local
from fedpeft.strategies import LoRAStrategy, get_strategy
from fedpeft.strategies.base import GlobalModel, NodeInfo, short_reason

log = logging.getLogger("fedpeft")


class RunError(RuntimeError):
    """The run cannot go on (too few nodes, every client failed, ...); the message says why."""


def initial_adapter(cm: models.CachedModel, *, rank: int | None, seed: int) -> State:
    """The round-0 adapter at ``rank``: A drawn from ``seed``, B zero (peft's init), the head (and any
    other tensor) as peft built it — not what the cached model's adapter holds after earlier jobs."""
    return fresh_lora(cm.built_state(rank), seed=seed)


class ServerEvaluator:
    """Evaluates a :class:`GlobalModel` on the held-out test split with the server's own model copy."""

    def __init__(self, cfg: Config, data: FederatedData, *, lineage: str) -> None:
        self.cfg = cfg
        self.lineage = lineage
        self.cm = models.cached_model(cfg.model, num_labels=data.num_labels, device=models.resolve_device(cfg.device), seed=cfg.seed)
        tokenizer = models.load_tokenizer(cfg.model)
        examples = encode_config(cfg, data.test, tokenizer)
        self.loader = make_loader(examples, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.server_eval_batch_size, shuffle=False, collate_fn=collator_for(cfg, tokenizer))
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


def exchange(grid: Grid, messages: list[Message], *, timeout: float, poll: float = 0.2) -> list[tuple[int, Message]]:
    """Send ``messages``; returns the replies that arrive within ``timeout`` s, each with its node.

    ``Grid.send_and_receive`` with two differences: a short poll (Flower's deployment grid sleeps
    3 s between pulls, which every exchange would pay for nothing), and a reply is attributed to
    the node its request went to — an error reply the SuperLink writes for a node that stopped
    sending heartbeats has the SuperLink, not that node, as its sender.
    """
    pending = set(grid.push_messages(messages))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    replies: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend((sent_to[m.metadata.reply_to_message_id], m) for m in arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def handshake(grid: Grid, cfg: Config, run: protocol.RunInfo, *, timeout: float = 600.0, run_dir: Path | None = None) -> list[NodeInfo]:
    """Wait for ``num_clients`` nodes, ask each for its partition, rank and data size; with ``run_dir``,
    write the node status table (``nodes.json``, and the log)."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise RunError(f"only {len(node_ids)} of num_clients={cfg.num_clients} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    messages = [Message(protocol.encode_query(run), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(node_ids)]
    nodes, seen, status = [], {}, []
    for node_id, reply in exchange(grid, messages, timeout=timeout):
        if reply.has_error():
            raise RunError(f"node {node_id} failed the handshake: {reply.error.reason}")
        hello = protocol.decode_query_reply(reply.content)
        info = NodeInfo(node_id=node_id, partition_id=hello.partition_id, rank=hello.rank, num_examples=hello.num_examples)
        if info.partition_id in seen:
            raise RunError(f"nodes {seen[info.partition_id]} and {node_id} both serve partition {info.partition_id}")
        seen[info.partition_id] = node_id
        nodes.append(info)
        status.append(node_row(node_id, hello, label_names=run.label_names))
    if run_dir is not None:
        write_node_status(status, run.label_names, run_dir)
    if len(nodes) < cfg.clients_per_round:
        raise RunError(f"{len(nodes)} nodes answered the handshake; clients_per_round={cfg.clients_per_round} needs more")
    return sorted(nodes, key=lambda n: n.partition_id)


def round_row(strategy: LoRAStrategy, server_round: int, *, wall: float, result: EvalResult | None, totals: dict[str, int]) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` from the strategy's round report."""
    report = strategy.reports[server_round]
    up, down = sum(report.bytes_up.values()), sum(report.bytes_down.values())
    totals["up"] += up
    totals["down"] += down
    weights = [c[protocol.NUM_EXAMPLES] for c in report.clients]
    train_loss = sum(w * c[protocol.TRAIN_LOSS] for w, c in zip(weights, report.clients)) / sum(weights) if weights else None
    clients = []
    for c in sorted(report.clients, key=lambda c: c["partition"]):
        node = c["node"]
        clients.append({k.replace("-", "_"): v for k, v in c.items()} | {"bytes_up": report.bytes_up.get(node, 0), "bytes_down": report.bytes_down.get(node, 0)})
    epsilons = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
    # The clients' validation accuracy: from the federated evaluation when the rule ran one, else
    # from the train replies (each client's model right after local training).
    source = "evaluate" if report.evaluations else "train"
    measured = [c for c in (report.evaluations or report.clients) if c.get(protocol.VAL_ACCURACY) is not None]
    spread = weighted_spread([c[protocol.VAL_ACCURACY] for c in measured], [c.get(protocol.VAL_EXAMPLES, c.get(protocol.NUM_EXAMPLES, 1)) for c in measured])
    return {
        "round": server_round,
        "test_accuracy": None if result is None else result.accuracy,
        "test_loss": None if result is None else result.loss,
        "train_loss": train_loss,
        "clients_sampled": len(report.sampled),
        "clients_replied": len(report.clients),
        "clients_failed": len(report.failures),
        "clients_rejected": len(report.rejected),
        "wall_seconds": wall,
        "bytes_up": up,
        "bytes_down": down,
        "cumulative_bytes_up": totals["up"],
        "cumulative_bytes_down": totals["down"],
        "bytes_down_per_client": {str(p): b for p, b in sorted((strategy.nodes[n].partition_id, b) for n, b in report.bytes_down.items())},
        "residual": report.extra.get("residual"),
        "max_epsilon": max(epsilons) if epsilons else None,
        **{f"client_val_accuracy_{k}": v for k, v in spread.items()},
        "client_val_accuracy_source": source if measured else None,
        "evaluations": [{k.replace("-", "_"): v for k, v in e.items()} for e in sorted(report.evaluations, key=lambda e: e["partition"])],
        "clients": clients,
        "rejected": report.rejected,
        "failures": report.failures,
        "unreachable": [{"node": f["node"], "partition": strategy.nodes[f["node"]].partition_id} for f in report.failures if f.get("unreachable")],
        **{k: v for k, v in report.extra.items() if k != "residual"},
    }


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically: a crash mid-write leaves the previous one intact."""
    import io

    from fedpeft.clients.state import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / CHECKPOINT, buf.getvalue())


def load_checkpoint(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The last complete round of ``run_dir``; its config must be the one being resumed."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise RunError(f"resume={str(run_dir)!r}: no {CHECKPOINT} there (the run finished no round, or this is not a run directory)")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written above
    saved, wanted = state["config"], to_json(_without_resume(cfg))
    if saved != wanted:
        import json

        a, b = json.loads(saved), json.loads(wanted)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff != ["num_rounds"]:
            raise RunError(f"resume={str(run_dir)!r}: the config differs from the checkpoint's in {diff}")
        check_extension(run_dir, cfg, planned=a["num_rounds"])
    return state


def check_extension(run_dir: Path, cfg: Config, *, planned: int) -> None:
    """``resume=`` with another ``num_rounds``: the run goes on (or stops) as one planned for that many rounds would.

    Nothing a round does depends on ``num_rounds`` except DP noise calibrated to reach
    ``target_epsilon`` over the planned rounds: those runs cannot be lengthened (the rounds already
    trained spent their share of a budget sized for ``planned`` rounds).
    """
    dp = cfg.client.dp
    if cfg.num_rounds > planned and dp.enabled and dp.noise_multiplier is None:
        raise RunError(
            f"resume={str(run_dir)!r} with num_rounds={cfg.num_rounds}: its DP noise was calibrated to reach ε={dp.target_epsilon} "
            f"over {planned} rounds, so more rounds would exceed that budget; start a new run with num_rounds={cfg.num_rounds}, "
            f"or resume it with num_rounds={planned}"
        )


def _without_resume(cfg: Config) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, resume=None)


def run_federated(cfg: Config, grid: Grid, run_dir: Path) -> list[dict[str, Any]]:
    """Run ``cfg.num_rounds`` rounds of federated LoRA over ``grid``; returns the metrics rows.

    After every round the complete server state goes to ``checkpoint.pt``; with ``cfg.resume``
    the run continues from it and ends exactly as an uninterrupted run would.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ranks = client_ranks(cfg)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    checkpoint = load_checkpoint(run_dir, cfg) if cfg.resume else None
    lineage = checkpoint["lineage"] if checkpoint else f"{run_dir.name}-{time.time_ns():x}"
    evaluator = ServerEvaluator(cfg, data, lineage=lineage)
    rank = max(ranks) if models.has_ranks(cfg.model) else None
    strategy = get_strategy(cfg.strategy.name).from_config(cfg, initial_adapter(evaluator.cm, rank=rank, seed=cfg.seed))
    # Simulated nodes keep their state under the run; deployed ones in their own state-dir.
    run = protocol.RunInfo(config_json=to_json(_without_resume(cfg)), label_names=tuple(data.label_names), sim_state_dir=None if cfg.mode == "deploy" else str(run_dir / "nodes"))
    strategy.run, strategy.lineage = run, lineage
    strategy.register_nodes(handshake(grid, cfg, run, run_dir=run_dir))

    first_round, totals = 1, {"up": 0, "down": 0}
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    if checkpoint:
        strategy.load_state_dict(checkpoint["strategy"])
        first_round, totals = checkpoint["round"] + 1, dict(checkpoint["totals"])
        for row in checkpoint["rows"]:  # metrics.jsonl/csv rewritten up to the checkpoint
            writer.write(row, rounds_done=row["round"])
        log.info("resumed %s after round %d; it runs to round %d", run_dir, checkpoint["round"], cfg.num_rounds)
    for server_round in range(first_round, cfg.num_rounds + 1):
        started = time.perf_counter()
        for attempt in range(cfg.max_retries + 1 if cfg.on_too_few == "retry" else 1):
            report = train_round(strategy, grid, server_round, attempt=attempt, timeout=cfg.round_timeout)
            if len(report.clients) >= max(cfg.min_clients, 1):
                break
            reasons = [f["reason"] for f in report.failures] + [r["reason"] for r in report.rejected]
            if cfg.on_too_few == "retry" and attempt < cfg.max_retries:
                log.warning("round %d: %d accepted updates < min_clients=%d; retrying (%d/%d): %s", server_round, len(report.clients), cfg.min_clients, attempt + 1, cfg.max_retries, reasons[:3])
                continue
            raise RunError(
                f"round {server_round}: {len(report.clients)} accepted updates, fewer than min_clients={max(cfg.min_clients, 1)}; "
                f"reasons: {reasons[:3]}"  # fedpeft.run says how to resume, if a round finished
            )
        evaluate_now = evaluates(cfg, server_round)
        if evaluate_now:
            evaluate_round(strategy, grid, server_round, timeout=cfg.round_timeout)
        result = evaluator(strategy.global_model()) if evaluate_now and strategy.has_global_model else None
        row = round_row(strategy, server_round, wall=time.perf_counter() - started, result=result, totals=totals)
        if result is not None:
            row.update(evaluator.extra)
        stop = cfg.comm_budget_mb is not None and (totals["up"] + totals["down"]) / 1e6 >= cfg.comm_budget_mb
        if stop and result is None and strategy.has_global_model:
            row.update(_eval_fields(evaluator(strategy.global_model())))
            row.update(evaluator.extra)
        writer.write(row)
        save_checkpoint(
            run_dir,
            {"round": server_round, "strategy": strategy.state_dict(), "totals": totals, "rows": writer.rows, "lineage": lineage, "config": run.config_json},
        )
        if stop:
            log.info("communication budget of %.2f MB reached after round %d; stopping", cfg.comm_budget_mb, server_round)
            break
    if cfg.save_adapter and strategy.has_global_model:
        save_final(evaluator, strategy.global_model(), run_dir)
    return writer.rows


def evaluate_round(strategy: LoRAStrategy, grid: Grid, server_round: int, *, timeout: float) -> None:
    """The strategy's federated evaluation (its ``evaluation_plan`` hook), if it asks for one."""
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord({}), grid))
    if messages:
        strategy.aggregate_evaluate(server_round, [reply for _, reply in exchange(grid, messages, timeout=timeout)])


def train_round(strategy: LoRAStrategy, grid: Grid, server_round: int, *, attempt: int = 0, timeout: float):
    """Send one round's train messages, collect what comes back in time, aggregate; returns the report."""
    strategy.reports.pop(server_round, None)  # a retried round starts a fresh report
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({protocol.ATTEMPT: attempt}), grid))
    report = strategy.reports[server_round]
    answered, replies = set(), []
    for node_id, reply in exchange(grid, messages, timeout=timeout):
        answered.add(node_id)
        if reply.has_error():  # failed on the node, or the node is gone: counted here, never aggregated
            gone = reply.error.code == ErrorCode.NODE_UNAVAILABLE  # the SuperLink's word that the node stopped sending heartbeats
            report.failures.append({"node": node_id, "reason": short_reason(reply.error.reason), "unreachable": gone})
            log.warning("round %d: node %d failed: %s", server_round, node_id, report.failures[-1]["reason"])
        else:
            replies.append(reply)
    for msg in messages:
        if msg.metadata.dst_node_id not in answered:
            report.failures.append({"node": msg.metadata.dst_node_id, "reason": f"no reply within round_timeout={timeout} s", "unreachable": True})
            log.warning("round %d: node %d did not reply within %.0f s", server_round, msg.metadata.dst_node_id, timeout)
    aggregating = time.perf_counter()
    strategy.aggregate_train(server_round, replies)
    report.extra["aggregation_seconds"] = time.perf_counter() - aggregating  # the server's share of the round
    return report


def _eval_fields(result: EvalResult) -> dict[str, float]:
    return {"test_accuracy": result.accuracy, "test_loss": result.loss}


def save_final(evaluator: ServerEvaluator, global_model: GlobalModel, run_dir: Path) -> Path:
    """Write the final global model so plain transformers / peft load it.

    Rules that never move the base: ``final_adapter/`` with ``save_pretrained`` (load it with
    ``PeftModel.from_pretrained(base, path)``). A moved base: ``final_model/``, the merged
    weights and head as a plain transformers checkpoint (``AutoModel....from_pretrained(path)``).
    """
    model = evaluator.load(global_model)
    name = models.adapter_name(global_model.rank)
    if not global_model.base_updates:
        target = run_dir / "final_adapter"
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            model.save_pretrained(tmp, selected_adapters=[name])
            produced = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(produced), str(target))
        return target
    target = run_dir / "final_model"
    merged = merged_checkpoint(evaluator.cm, global_model)
    merged.save_pretrained(target)
    models.load_tokenizer(evaluator.cfg.model).save_pretrained(target)
    return target


def merged_checkpoint(cm: models.CachedModel, global_model: GlobalModel) -> torch.nn.Module:
    """A plain transformers model holding base + merged updates + the global adapter and head."""
    fresh = models.load_base_model(cm.cfg, num_labels=cm.model.config.num_labels if cm.cfg.task == "seq_cls" else 0)
    prefix = "base_model.model."
    state = fresh.state_dict()
    for module, layer in cm.base_layers().items():
        state[module[len(prefix) :] + ".weight"] = layer.weight.detach().cpu().clone()
    # The global adapter merged as peft merges it (fan_in_fan_out, scaling), in float64.
    name = models.adapter_name(global_model.rank)
    for module, layer in cm.lora_layers().items():
        key = module[len(prefix) :] + ".weight"
        state[key] = (state[key].to(torch.float64) + models.adapter_delta(layer, name)).to(state[key].dtype)
    _, heads = split_state(global_model.adapter)
    for key in heads:
        state[key[len(prefix) :]] = global_model.adapter[key]
    fresh.load_state_dict(state)
    return fresh


# ------------------------------------------------------------------------------ the bounds
def one_process_run(cfg: Config, run_dir: Path, *, lineage: str) -> tuple[FederatedData, ServerEvaluator, torch.nn.Module, Any]:
    """What a run without clients (the centralised and local-only bounds) starts from: its data,
    the evaluator, the model holding the run's initial adapter, and the tokenizer."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # no clients share the machine: every core it may run on
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    evaluator = ServerEvaluator(cfg, data, lineage=lineage)
    rank = cfg.model.lora.r
    model = evaluator.load(GlobalModel(adapter=initial_adapter(evaluator.cm, rank=rank, seed=cfg.seed), rank=rank))
    return data, evaluator, model, models.load_tokenizer(cfg.model)


def run_centralized(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """The non-federated reference: one LoRA model trained on the pooled training data.

    Each "round" trains as many steps as one federated round does in total
    (``clients_per_round`` × local steps), so curves compare at equal compute; the test split is
    scored every ``eval_every`` rounds and after the last, as in a federated run.
    """
    data, evaluator, model, tokenizer = one_process_run(cfg, run_dir, lineage="centralized")
    rank = cfg.model.lora.r
    pooled = [data.client_split(k)[0] for k in range(cfg.num_clients)]
    examples = [e for ds in pooled for e in encode_config(cfg, ds, tokenizer)]
    per_client = sum(len(ds) for ds in pooled) / cfg.num_clients
    steps = cfg.clients_per_round * num_local_steps(
        num_examples=round(per_client), batch_size=cfg.client.batch_size, local_epochs=cfg.client.local_epochs, local_steps=cfg.client.local_steps
    )
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    for server_round in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        loader = make_loader(
            examples, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.client.batch_size, shuffle=True, seed=round_seed(cfg.seed, server_round), collate_fn=collator_for(cfg, tokenizer)
        )
        torch.manual_seed(round_seed(cfg.seed, server_round))  # dropout: a rerun repeats the run
        train = train_local(model, loader, num_steps=steps, lr=round_lr(cfg.client, server_round), weight_decay=cfg.client.weight_decay, device=evaluator.cm.device)
        evaluate_now = evaluates(cfg, server_round)  # as the federated server does
        result = evaluate(model, evaluator.loader, device=evaluator.cm.device) if evaluate_now else None
        extra = evaluator.llm(model, device=evaluator.cm.device, batch_size=cfg.server_eval_batch_size) if evaluate_now and evaluator.llm and evaluator.llm.active else {}
        writer.write(
            {
                "round": server_round,
                "test_accuracy": result.accuracy if result else None,
                "test_loss": result.loss if result else None,
                "train_loss": train.loss,
                "clients_sampled": 0,
                "clients_replied": 0,
                "wall_seconds": time.perf_counter() - started,
                "bytes_up": 0,
                "bytes_down": 0,
                "cumulative_bytes_up": 0,
                "cumulative_bytes_down": 0,
                **extra,
            }
        )
    if cfg.save_adapter:
        save_final(evaluator, GlobalModel(adapter=evaluator.cm.adapter_state(rank), rank=rank), run_dir)
    return writer.rows


def run_local_only(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """The local-only bound: every client trains its own adapter on its own data, and never communicates.

    Each round every client (all of them, not a sample: the strongest local-only baseline) trains
    the steps a sampled federated client trains in a round, from where its own model stopped, with a
    fresh optimiser as a federated client has. All clients start from the same initial adapter.
    A round's row reports the clients' models on the held-out test split (``test_accuracy``: the
    mean over clients weighted by their training examples, and its spread) and on each client's
    own validation slice (``client_val_accuracy_*``, as the federated evaluation reports it).
    """
    data, evaluator, model, tokenizer = one_process_run(cfg, run_dir, lineage="local-only")
    rank = cfg.model.lora.r
    start = evaluator.cm.adapter_state(rank)  # the initial adapter every client starts from
    collate = collator_for(cfg, tokenizer)
    splits = [data.client_split(k) for k in range(cfg.num_clients)]
    train_sets = [encode_config(cfg, train, tokenizer) for train, _ in splits]
    val_loaders = [
        make_loader(encode_config(cfg, val, tokenizer), pad_token_id=tokenizer.pad_token_id, batch_size=cfg.client.eval_batch_size, shuffle=False, collate_fn=collate)
        if len(val) else None
        for _, val in splits
    ]
    weights = [len(ex) for ex in train_sets]
    adapters = [dict(start) for _ in range(cfg.num_clients)]
    writer = MetricsWriter(run_dir, num_rounds=cfg.num_rounds, logger=cfg.logger)
    for server_round in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        losses, tests, vals = [], [], []
        for k, examples in enumerate(train_sets):
            evaluator.cm.load_adapter_state(rank, adapters[k])
            steps = num_local_steps(num_examples=len(examples), batch_size=cfg.client.batch_size, local_epochs=cfg.client.local_epochs, local_steps=cfg.client.local_steps)
            loader = make_loader(
                examples, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.client.batch_size, shuffle=True, seed=round_seed(cfg.seed, server_round) + k, collate_fn=collate
            )
            torch.manual_seed(round_seed(cfg.seed, server_round) + k)  # dropout, as a federated client seeds it
            losses.append(train_local(model, loader, num_steps=steps, lr=round_lr(cfg.client, server_round), weight_decay=cfg.client.weight_decay, device=evaluator.cm.device).loss)
            adapters[k] = evaluator.cm.adapter_state(rank)
            if evaluates(cfg, server_round):
                tests.append(evaluate(model, evaluator.loader, device=evaluator.cm.device))
                if val_loaders[k] is not None:
                    vals.append((len(val_loaders[k].dataset), evaluate(model, val_loaders[k], device=evaluator.cm.device).accuracy))
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": sum(w * loss for w, loss in zip(weights, losses)) / sum(weights),
            "clients_sampled": cfg.num_clients,
            "clients_replied": cfg.num_clients,
            "bytes_up": 0,
            "bytes_down": 0,
            "cumulative_bytes_up": 0,
            "cumulative_bytes_down": 0,
        }
        if tests:
            spread = weighted_spread([t.accuracy for t in tests], weights)
            row["test_accuracy"], row["test_loss"] = spread["mean"], weighted_spread([t.loss for t in tests], weights)["mean"]
            row.update({f"test_accuracy_{k}": spread[k] for k in ("std", "min", "max")})
        if vals:
            row.update({f"client_val_accuracy_{k}": v for k, v in weighted_spread([a for _, a in vals], [w for w, _ in vals]).items()})
        row["wall_seconds"] = time.perf_counter() - started
        writer.write(row)
    return writer.rows
