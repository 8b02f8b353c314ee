"""The open protocol between the server and its clients: typed plans and every key on the wire.

The server tells a client what to do as data, never by naming a rule. One round of one client is
a :class:`ClientPlan`:

* for each :class:`GroupPlan` — a set of adapter tensors selected by their peft key *role*
  (:data:`LORA_A`: keys ending in ``.lora_A.weight``; :data:`LORA_B`: ``.lora_B.weight``;
  :data:`OTHER`: every other trainable tensor, a head, an IA3 vector, prompt embeddings) —
  where its starting value comes from (:class:`Source`: the message, a seed the client
  regenerates, zero, or the node's own state kept from an earlier round, with a fallback when
  the node has none), whether it trains, whether it goes back up and whether the node keeps it;
* the base: which run lineage and version of the moving base to train on, and the base updates
  the node has not seen yet (stacked LoRA factors, :class:`BasePlan`);
* what to evaluate on the node's validation slice (:class:`Evaluate`);
* optionally, rank self-pruning (:class:`RankPruning`): a penalty on the adapter's last rank
  components while training, and the rank the client may shrink to when they faded.

A non-LoRA peft method has only :data:`OTHER` tensors, so a single "all trainable" group
(:data:`ALL_ROLES`) federates it. :func:`encode_instruction` / :func:`decode_instruction` turn a
plan (and the tensors it sends) into Flower records and back; :func:`encode_reply` /
:func:`decode_reply` the client's answer. Decoding refuses an unknown or inconsistent plan with
a :class:`ProtocolError` that says why. Every key string that travels is defined in this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.protocol.records import LORA_A_SUFFIX, LORA_B_SUFFIX, State, from_record, to_record

PLAN_VERSION = 1

# ------------------------------------------------------------------------------ records of a message
RUN_RECORD = "config"  # ConfigRecord: what every message of a run carries (the run's config, labels)
PLAN_RECORD = "plan"  # ConfigRecord: the client plan of a train or evaluate message
ARRAYS_RECORD = "arrays"  # ArrayRecord: adapter tensors (down: message-sourced groups; up: uploads)
BASE_UPDATES_RECORD = "base-updates"  # ArrayRecord: missed base updates, keys "<round>|<stack key>"
METRICS_RECORD = "metrics"  # MetricRecord of a reply
COMPRESSED_RECORD = (
    "compressed"  # ArrayRecord of a reply: packed updates (uint8, fedpeft.compression.compeft), keyed like the tensors
)
NODE_INFO_RECORD = "node-info"  # ConfigRecord of a handshake reply: what is not a number (the node's tier)

# --- keys of the run record (and of a deployed run's run config)
FEDPEFT_CONFIG = "fedpeft-config"  # the run's Config as JSON
LABEL_NAMES = "label-names"  # the run's label names, so a node with its own data numbers them alike
SIM_STATE_DIR = "sim-state-dir"  # simulation only: the folder holding every simulated node's state
RUN_DIR = "run-dir"  # deployed run config: where the ServerApp writes results

# --- keys of the plan record
PLAN_VERSION_KEY = "plan-version"
SERVER_ROUND = "server-round"
ATTEMPT = "attempt"
RANK = "rank"  # also a metric key: the rank a client trained at
GROUPS = "groups"  # JSON list of groups (field names below)
EVALUATE = "evaluate"
BASE_LINEAGE = "base-lineage"
BASE_VERSION = "base-version"
PRUNE_DECAY = "prune-decay"  # rank self-pruning (RankPruning); absent: the client keeps its rank
PRUNE_WEIGHT = "prune-weight"
PRUNE_MIN_RANK = "prune-min-rank"
_PRUNE_KEYS = {PRUNE_DECAY, PRUNE_WEIGHT, PRUNE_MIN_RANK}
_PLAN_KEYS = {PLAN_VERSION_KEY, SERVER_ROUND, ATTEMPT, RANK, GROUPS, EVALUATE, BASE_LINEAGE, BASE_VERSION} | _PRUNE_KEYS
_GROUP_FIELDS = {"roles", "source", "seed", "seed_rank", "fallback", "train", "upload", "keep"}

# --- metric keys (kebab-case, as Flower's)
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
VAL_ACCURACY = "val-accuracy"
VAL_EXAMPLES = "val-examples"
EVALUATED = "evaluated"  # which model a client evaluated: 1 global, 2 personal
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
TAIL_NORM_BEFORE = "tail-norm-before"  # rank self-pruning: the penalised tail's norm before and after training
TAIL_NORM_AFTER = "tail-norm-after"
EPSILON = "epsilon"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
DP_STEPS = "dp-steps"
DP_ROUNDS = "dp-rounds"
LABEL_COUNTS = "label-counts"  # handshake: the node's training examples per label (for the node status table)

# --- node config keys (``flower-supernode --node-config "partition-id=0 state-dir='...'"``)
NODE_PARTITION_ID = "partition-id"
NODE_STATE_DIR = "state-dir"
NODE_DATA_PATH = "data-path"
NODE_RANK = "rank"
NODE_TIER = "tier"

# ------------------------------------------------------------------------------ roles of adapter keys
LORA_A = "lora_a"
LORA_B = "lora_b"
OTHER = "other"
ROLES = (LORA_A, LORA_B, OTHER)
ALL_ROLES = frozenset(ROLES)


class ProtocolError(ValueError):
    """A message or plan that cannot be interpreted; the message says why."""


def _number(value: Any) -> float:
    """A scalar config-record value as a number (records type their values as a union with lists)."""
    if isinstance(value, (list, bytes)):
        raise ProtocolError(f"expected a number, got {value!r}")
    return float(value)


def _int(value: Any) -> int:
    """A scalar config-record value as an int (see :func:`_number`)."""
    if isinstance(value, (list, bytes)):
        raise ProtocolError(f"expected an integer, got {value!r}")
    return int(value)


def key_role(key: str) -> str:
    """The role of a peft state-dict key, by its exact suffix (never by substring or shape)."""
    if key.endswith(LORA_A_SUFFIX):
        return LORA_A
    if key.endswith(LORA_B_SUFFIX):
        return LORA_B
    return OTHER


def keys_with_roles(keys: Sequence[str], roles: frozenset[str]) -> list[str]:
    """The keys among ``keys`` whose role is in ``roles``, in sorted order."""
    return sorted(k for k in keys if key_role(k) in roles)


class Source(str, Enum):
    """Where a group's starting value comes from."""

    MESSAGE = "message"  # the tensors in the message's arrays record
    SEED = "seed"  # drawn by the client from ``seed`` (bit-identical on every node)
    ZERO = "zero"  # zeros
    NODE = "node"  # what the node kept after its last round (``keep``), else ``fallback``


class Evaluate(str, Enum):
    """Which model a client evaluates on its validation slice."""

    NONE = "none"
    GLOBAL = "global"  # the model the plan's sources build, before any local training
    PERSONAL = "personal"  # the client's own model: after local training, or from its node state


@dataclass(frozen=True)
class GroupPlan:
    """What one client does with one group of adapter tensors in one round.

    ``roles`` selects the group's keys (:func:`key_role`). ``seed`` is required for
    :attr:`Source.SEED` (also as a fallback) and ``seed_rank`` says at which rank it is drawn
    before the first ``rank`` components are kept, so clients of every rank share one draw.
    ``fallback`` is required for :attr:`Source.NODE`: the source used when the node has nothing.
    """

    roles: frozenset[str]
    source: Source = Source.MESSAGE
    train: bool = True
    upload: bool = True
    keep: bool = False
    seed: int | None = None
    seed_rank: int | None = None
    fallback: Source | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", frozenset(self.roles))
        object.__setattr__(self, "source", Source(self.source))
        if self.fallback is not None:
            object.__setattr__(self, "fallback", Source(self.fallback))
        check_group(self)


@dataclass(frozen=True)
class BasePlan:
    """The moving base: train on ``version`` server updates of run ``lineage``.

    ``updates[t]`` is the update of round t that the node lacks, as stacked factors (peft keys;
    ``lora_A`` (Σr, d_in) with the scalings folded in, ``lora_B`` (d_out, Σr)); ΔW = B @ A.
    """

    lineage: str = ""
    version: int = 0
    updates: Mapping[int, State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ProtocolError(f"base version must be >= 0, got {self.version}")
        late = sorted(t for t in self.updates if not 1 <= t <= self.version)
        if late:
            raise ProtocolError(f"base updates {late} lie outside versions 1..{self.version}")


@dataclass(frozen=True)
class RankPruning:
    """Rank self-pruning on a client (HetLoRA's, Cho et al. 2024), as data in the plan.

    A client at rank r trains with the penalty ``weight · Σ_layers ‖B[:, t:r]‖_F ‖A[t:r, :]‖_F``
    added to its loss, where ``t = pruned_rank(r) = max(min_rank, ⌊decay · r⌋)``: the components it
    would drop. If training left that tail norm smaller than it started, the client drops them and
    replies at rank t (its first t components, as trained); the server sends it rank t from then on.
    """

    decay: float
    weight: float
    min_rank: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ProtocolError(f"pruning decay must lie in (0, 1), got {self.decay}")
        if not (self.weight >= 0.0 and self.weight < float("inf")):
            raise ProtocolError(f"pruning weight must be finite and >= 0, got {self.weight}")
        if self.min_rank < 1:
            raise ProtocolError(f"pruning min_rank must be >= 1, got {self.min_rank}")

    def pruned_rank(self, rank: int) -> int:
        """The rank a client at ``rank`` shrinks to (``rank`` itself when nothing can go)."""
        return min(rank, max(self.min_rank, int(self.decay * rank)))


@dataclass(frozen=True)
class ClientPlan:
    """One client's instructions for one round (see the module docstring)."""

    groups: tuple[GroupPlan, ...]
    server_round: int
    rank: int | None = None
    base: BasePlan = field(default_factory=BasePlan)
    evaluate: Evaluate = Evaluate.PERSONAL
    attempt: int = 0
    prune: RankPruning | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "evaluate", Evaluate(self.evaluate))
        check_plan(self)

    def group_of(self, key: str) -> GroupPlan:
        role = key_role(key)
        return next(g for g in self.groups if role in g.roles)

    def keys(
        self, keys: Sequence[str], *, source: Source | None = None, upload: bool | None = None, keep: bool | None = None
    ) -> list[str]:
        """The keys among ``keys`` whose group matches every given condition, sorted."""
        out = []
        for key in keys:
            g = self.group_of(key)
            if (
                (source is None or g.source == source)
                and (upload is None or g.upload == upload)
                and (keep is None or g.keep == keep)
            ):
                out.append(key)
        return sorted(out)

    @property
    def trains(self) -> bool:
        return any(g.train for g in self.groups)

    def reply_ranks(self) -> tuple[int | None, ...]:
        """The ranks a train reply to this plan may have: the plan's, or the pruned one."""
        if self.prune is None or self.rank is None:
            return (self.rank,)
        return tuple(sorted({self.rank, self.prune.pruned_rank(self.rank)}, reverse=True))


def single_group(**kwargs: Any) -> tuple[GroupPlan, ...]:
    """One group holding every trainable tensor (what FedAvg, and any non-LoRA peft method, uses)."""
    return (GroupPlan(roles=ALL_ROLES, **kwargs),)


# ------------------------------------------------------------------------------ consistency
def check_group(g: GroupPlan) -> None:
    unknown = sorted(set(g.roles) - ALL_ROLES)
    if not g.roles or unknown:
        raise ProtocolError(f"a group selects roles from {list(ROLES)}; got {sorted(g.roles)}")
    seeded = g.source == Source.SEED or g.fallback == Source.SEED
    if seeded and g.seed is None:
        raise ProtocolError(f"group {sorted(g.roles)}: source 'seed' without a seed")
    if not seeded and (g.seed is not None or g.seed_rank is not None):
        raise ProtocolError(
            f"group {sorted(g.roles)}: a seed is given but nothing is drawn from it (source {g.source.value!r})"
        )
    if g.seed_rank is not None and g.seed_rank < 1:
        raise ProtocolError(f"group {sorted(g.roles)}: seed_rank must be >= 1, got {g.seed_rank}")
    if g.source == Source.NODE and g.fallback in (None, Source.NODE):
        raise ProtocolError(
            f"group {sorted(g.roles)}: source 'node' needs a fallback (message, seed or zero) for a node that has no state"
        )
    if g.source != Source.NODE and g.fallback is not None:
        raise ProtocolError(
            f"group {sorted(g.roles)}: a fallback only applies to source 'node', not {g.source.value!r}"
        )
    if g.upload and not g.train and g.source != Source.NODE:
        raise ProtocolError(
            f"group {sorted(g.roles)} is uploaded but neither trained nor taken from the node's state: "
            f"the server already knows its value (source {g.source.value!r})"
        )


def check_plan(plan: ClientPlan) -> None:
    if plan.server_round < 0:
        raise ProtocolError(f"server round must be >= 0, got {plan.server_round}")
    if plan.rank is not None and plan.rank < 1:
        raise ProtocolError(f"rank must be >= 1, got {plan.rank}")
    seen: set[str] = set()
    for g in plan.groups:
        overlap = seen & g.roles
        if overlap:
            raise ProtocolError(f"roles {sorted(overlap)} belong to more than one group")
        seen |= g.roles
        if g.seed_rank is not None and plan.rank is not None and g.seed_rank < plan.rank:
            raise ProtocolError(f"group {sorted(g.roles)}: seed_rank {g.seed_rank} < the client's rank {plan.rank}")
    if seen != ALL_ROLES:
        raise ProtocolError(f"the plan says nothing about roles {sorted(ALL_ROLES - seen)}; every role needs a group")
    if plan.prune is not None:
        if plan.rank is None:
            raise ProtocolError("rank self-pruning needs a LoRA rank; this plan has none")
        trained = {role for g in plan.groups if g.train for role in g.roles}
        uploaded = {role for g in plan.groups if g.upload for role in g.roles}
        if not {LORA_A, LORA_B} <= trained & uploaded:
            raise ProtocolError(
                "rank self-pruning needs both LoRA factors trained and uploaded (it penalises and drops components of both)"
            )


# ------------------------------------------------------------------------------ run record
@dataclass(frozen=True)
class RunInfo:
    """What every message of a run carries: its config (JSON), label names, the simulated state folder."""

    config_json: str
    label_names: tuple[str, ...] = ()
    sim_state_dir: str | None = None

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord({FEDPEFT_CONFIG: self.config_json, LABEL_NAMES: list(self.label_names)})
        if self.sim_state_dir is not None:
            record[SIM_STATE_DIR] = self.sim_state_dir
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RunInfo:
        if FEDPEFT_CONFIG not in record:
            raise ProtocolError(f"the message's {RUN_RECORD!r} record has no {FEDPEFT_CONFIG!r}")
        state_dir = record.get(SIM_STATE_DIR)
        return cls(
            config_json=str(record[FEDPEFT_CONFIG]),
            label_names=tuple(str(n) for n in cast(list, record.get(LABEL_NAMES, []))),
            sim_state_dir=None if state_dir is None else str(state_dir),
        )


def run_info(content: RecordDict) -> RunInfo:
    if RUN_RECORD not in content.config_records:
        raise ProtocolError(f"the message has no {RUN_RECORD!r} record")
    return RunInfo.from_record(content.config_records[RUN_RECORD])


# ------------------------------------------------------------------------------ instructions (server -> client)
def encode_plan(plan: ClientPlan) -> ConfigRecord:
    groups = [
        {
            "roles": sorted(g.roles),
            "source": g.source.value,
            "seed": g.seed,
            "seed_rank": g.seed_rank,
            "fallback": None if g.fallback is None else g.fallback.value,
            "train": g.train,
            "upload": g.upload,
            "keep": g.keep,
        }
        for g in plan.groups
    ]
    record = ConfigRecord(
        {
            PLAN_VERSION_KEY: PLAN_VERSION,
            SERVER_ROUND: plan.server_round,
            ATTEMPT: plan.attempt,
            GROUPS: json.dumps(groups, sort_keys=True),
            EVALUATE: plan.evaluate.value,
            BASE_LINEAGE: plan.base.lineage,
            BASE_VERSION: plan.base.version,
        }
    )
    if plan.rank is not None:
        record[RANK] = plan.rank
    if plan.prune is not None:
        record[PRUNE_DECAY], record[PRUNE_WEIGHT], record[PRUNE_MIN_RANK] = (
            plan.prune.decay,
            plan.prune.weight,
            plan.prune.min_rank,
        )
    return record


def decode_plan(record: ConfigRecord, *, updates: Mapping[int, State] | None = None) -> ClientPlan:
    """The :class:`ClientPlan` in a plan record; :class:`ProtocolError` naming what is wrong."""
    unknown = sorted(set(record) - _PLAN_KEYS)
    if unknown:
        raise ProtocolError(f"unknown plan keys {unknown}; this client speaks plan version {PLAN_VERSION}")
    version = record.get(PLAN_VERSION_KEY)
    if version != PLAN_VERSION:
        raise ProtocolError(f"plan version {version!r}, this client speaks version {PLAN_VERSION}")
    for key in (SERVER_ROUND, GROUPS):
        if key not in record:
            raise ProtocolError(f"the plan has no {key!r}")
    try:
        raw_groups = json.loads(str(record[GROUPS]))
    except json.JSONDecodeError as err:
        raise ProtocolError(f"the plan's {GROUPS!r} is not JSON: {err}") from None
    groups = []
    for raw in raw_groups:
        extra = sorted(set(raw) - _GROUP_FIELDS)
        if extra:
            raise ProtocolError(f"unknown group fields {extra}")
        try:
            source = Source(raw.get("source", Source.MESSAGE.value))
            fallback = None if raw.get("fallback") is None else Source(raw["fallback"])
        except ValueError as err:
            raise ProtocolError(f"unknown source in the plan: {err}") from None
        groups.append(
            GroupPlan(
                roles=frozenset(raw.get("roles", ())),
                source=source,
                train=bool(raw.get("train", True)),
                upload=bool(raw.get("upload", True)),
                keep=bool(raw.get("keep", False)),
                seed=raw.get("seed"),
                seed_rank=raw.get("seed_rank"),
                fallback=fallback,
            )
        )
    try:
        evaluate = Evaluate(record.get(EVALUATE, Evaluate.NONE.value))
    except ValueError:
        raise ProtocolError(
            f"unknown evaluate target {record.get(EVALUATE)!r}; known: {[e.value for e in Evaluate]}"
        ) from None
    base = BasePlan(
        lineage=str(record.get(BASE_LINEAGE, "")),
        version=_int(record.get(BASE_VERSION, 0)),
        updates=dict(updates or {}),
    )
    rank = record.get(RANK)
    prune = None
    if _PRUNE_KEYS & set(record):
        missing = sorted(_PRUNE_KEYS - set(record))
        if missing:
            raise ProtocolError(f"rank self-pruning without {missing}")
        prune = RankPruning(
            decay=_number(record[PRUNE_DECAY]),
            weight=_number(record[PRUNE_WEIGHT]),
            min_rank=_int(record[PRUNE_MIN_RANK]),
        )
    return ClientPlan(
        groups=tuple(groups),
        server_round=_int(record[SERVER_ROUND]),
        rank=None if rank is None else _int(rank),
        base=base,
        evaluate=evaluate,
        attempt=_int(record.get(ATTEMPT, 0)),
        prune=prune,
    )


def encode_base_updates(updates: Mapping[int, State]) -> ArrayRecord:
    return to_record({f"{t}|{k}": v for t, stack in sorted(updates.items()) for k, v in stack.items()})


def decode_base_updates(record: ArrayRecord) -> dict[int, State]:
    out: dict[int, State] = {}
    for key, tensor in from_record(record).items():
        round_, sep, name = key.partition("|")
        if not sep or not round_.isdigit():
            raise ProtocolError(f"base update key {key!r} is not '<round>|<key>'")
        out.setdefault(int(round_), {})[name] = tensor
    return out


@dataclass(frozen=True)
class Instruction:
    """A decoded train or evaluate message: the run, the plan and the tensors sent."""

    run: RunInfo
    plan: ClientPlan
    tensors: State


def encode_instruction(run: RunInfo, plan: ClientPlan, tensors: Mapping[str, torch.Tensor]) -> RecordDict:
    """The content of a train or evaluate message.

    ``tensors`` must be exactly the keys of the message-sourced groups (checked by the client, which
    knows its adapter's keys); base updates travel in their own record.
    """
    content = RecordDict(
        {RUN_RECORD: run.to_record(), PLAN_RECORD: encode_plan(plan), ARRAYS_RECORD: to_record(tensors)}
    )
    if plan.base.updates:
        content[BASE_UPDATES_RECORD] = encode_base_updates(plan.base.updates)
    return content


def decode_instruction(content: RecordDict, *, evaluate_only: bool = False) -> Instruction:
    """Run, plan and tensors of a train (or, with ``evaluate_only``, an evaluate) message."""
    if PLAN_RECORD not in content.config_records:
        raise ProtocolError(
            f"the message has no {PLAN_RECORD!r} record (a server older than plan version {PLAN_VERSION}?)"
        )
    updates = (
        decode_base_updates(content.array_records[BASE_UPDATES_RECORD])
        if BASE_UPDATES_RECORD in content.array_records
        else {}
    )
    plan = decode_plan(content.config_records[PLAN_RECORD], updates=updates)
    if evaluate_only:
        if plan.trains or any(g.upload or g.keep for g in plan.groups):
            raise ProtocolError(
                "an evaluate message's plan trains, uploads or keeps a group; it may only build a model and evaluate it"
            )
        if plan.evaluate == Evaluate.NONE:
            raise ProtocolError("an evaluate message whose plan evaluates nothing")
    tensors = from_record(content.array_records[ARRAYS_RECORD]) if ARRAYS_RECORD in content.array_records else {}
    return Instruction(run=run_info(content), plan=plan, tensors=tensors)


# ------------------------------------------------------------------------------ replies (client -> server)
def encode_reply(
    tensors: Mapping[str, torch.Tensor] | None,
    metrics: Mapping[str, Any],
    *,
    packed: Mapping[str, np.ndarray] | None = None,
) -> RecordDict:
    """A train reply (uploaded tensors and metrics) or, with ``tensors=None``, an evaluate or query reply.

    ``packed``: uploads that travel compressed (:mod:`fedpeft.compression.compeft`), in their own record.
    """
    content = RecordDict({METRICS_RECORD: MetricRecord(dict(metrics))})
    if tensors is not None:
        content[ARRAYS_RECORD] = to_record(tensors)
    if packed:
        content[COMPRESSED_RECORD] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in packed.items()})
    return content


def decode_packed(content: RecordDict) -> dict[str, np.ndarray]:
    """The compressed uploads of a reply as raw arrays (empty when it has none); decoding is the server's."""
    if COMPRESSED_RECORD not in content.array_records:
        return {}
    return {key: array.numpy() for key, array in content.array_records[COMPRESSED_RECORD].items()}


def decode_reply(content: RecordDict, *, with_tensors: bool = True) -> tuple[State, dict[str, Any]]:
    """(uploaded tensors, metrics) of a reply; :class:`ProtocolError` when a part is missing."""
    if METRICS_RECORD not in content.metric_records:
        raise ProtocolError(f"reply has no {METRICS_RECORD!r} record")
    if with_tensors and ARRAYS_RECORD not in content.array_records:
        raise ProtocolError(f"reply has no {ARRAYS_RECORD!r} record (no adapter tensors)")
    tensors = from_record(content.array_records[ARRAYS_RECORD]) if ARRAYS_RECORD in content.array_records else {}
    return tensors, dict(content.metric_records[METRICS_RECORD])


# ------------------------------------------------------------------------------ the handshake
def encode_query(run: RunInfo) -> RecordDict:
    return RecordDict({RUN_RECORD: run.to_record()})


@dataclass(frozen=True)
class NodeHello:
    """A node's answer to the handshake."""

    partition_id: int
    rank: int | None  # None: the node's peft method has no rank
    num_examples: int
    label_counts: tuple[int, ...] = ()  # training examples per label of the run (empty: no labels, e.g. a causal LM)
    tier: str | None = None  # the node's resource tier, if it has one


def encode_query_reply(hello: NodeHello) -> RecordDict:
    metrics: dict[str, Any] = {PARTITION_ID: hello.partition_id, NUM_EXAMPLES: hello.num_examples}
    if hello.rank is not None:
        metrics[RANK] = hello.rank
    if hello.label_counts:
        metrics[LABEL_COUNTS] = [int(c) for c in hello.label_counts]
    content = encode_reply(None, metrics)
    if hello.tier is not None:
        content[NODE_INFO_RECORD] = ConfigRecord({NODE_TIER: hello.tier})
    return content


def decode_query_reply(content: RecordDict) -> NodeHello:
    _, m = decode_reply(content, with_tensors=False)
    missing = sorted({PARTITION_ID, NUM_EXAMPLES} - set(m))
    if missing:
        raise ProtocolError(f"handshake reply lacks {missing}")
    rank = m.get(RANK)
    info = content.config_records[NODE_INFO_RECORD] if NODE_INFO_RECORD in content.config_records else {}
    return NodeHello(
        partition_id=int(m[PARTITION_ID]), rank=None if rank is None else _int(rank), num_examples=int(m[NUM_EXAMPLES]),
        label_counts=tuple(int(c) for c in m.get(LABEL_COUNTS, [])), tier=str(info[NODE_TIER]) if NODE_TIER in info else None,
    )  # fmt: skip
