"""The plan protocol: round trips through Flower records, and refusals that say why."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord

from fedpeft.protocol import wire as protocol
from fedpeft.protocol.wire import (
    ALL_ROLES,
    LORA_A,
    LORA_B,
    OTHER,
    BasePlan,
    ClientPlan,
    Evaluate,
    GroupPlan,
    ProtocolError,
    RunInfo,
    Source,
    decode_instruction,
    decode_plan,
    encode_instruction,
    encode_plan,
)

RUN = RunInfo(config_json='{"seed": 3}', label_names=("a", "b"), sim_state_dir="/tmp/nodes")


def rich_plan() -> ClientPlan:
    """A plan using every feature: each source, a fallback, a seed rank, keep, a base with updates."""
    stack = {
        "m.q.lora_A.weight": torch.randn(5, 4, dtype=torch.float64),
        "m.q.lora_B.weight": torch.randn(3, 5, dtype=torch.float64),
    }
    return ClientPlan(
        groups=(
            GroupPlan(roles={LORA_A}, source=Source.SEED, seed=11, seed_rank=8, train=False, upload=False),
            GroupPlan(roles={LORA_B}, source=Source.NODE, fallback=Source.ZERO, keep=True, upload=False),
            GroupPlan(roles={OTHER}, source=Source.MESSAGE),
        ),
        server_round=4,
        rank=2,
        base=BasePlan(lineage="run-x", version=3, updates={2: stack, 3: stack}),
        evaluate=Evaluate.GLOBAL,
        attempt=1,
    )


def test_instruction_round_trip_keeps_plan_run_and_tensors():
    # Prepare
    plan = rich_plan()
    tensors = {"m.head.weight": torch.randn(2, 4)}
    # Execute
    back = decode_instruction(encode_instruction(RUN, plan, tensors))
    # Assert
    assert back.run == RUN
    assert back.plan.groups == plan.groups and back.plan.base.version == 3 and back.plan.base.lineage == "run-x"
    assert (back.plan.server_round, back.plan.rank, back.plan.evaluate, back.plan.attempt) == (4, 2, Evaluate.GLOBAL, 1)
    assert sorted(back.plan.base.updates) == [2, 3]
    assert all(torch.equal(back.plan.base.updates[2][k], v) for k, v in plan.base.updates[2].items())
    assert torch.equal(back.tensors["m.head.weight"], tensors["m.head.weight"])


def test_roles_select_keys_by_exact_suffix():
    keys = [
        "m.lora_head.lora_A.weight",
        "m.lora_head.lora_B.weight",
        "m.lora_head.weight",
        "m.q.ia3_l",
        "prompt_embeddings",
    ]
    assert [protocol.key_role(k) for k in keys] == [LORA_A, LORA_B, OTHER, OTHER, OTHER]
    plan = ClientPlan(groups=protocol.single_group(), server_round=1)
    assert plan.keys(keys, upload=True) == sorted(keys)  # one "all trainable" group serves any peft method


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: GroupPlan(roles={LORA_A}, source=Source.SEED), "without a seed"),
        (
            lambda: GroupPlan(roles=ALL_ROLES, source=Source.ZERO, train=False),
            "uploaded but neither trained nor taken from the node",
        ),
        (
            lambda: GroupPlan(roles=ALL_ROLES, source=Source.MESSAGE, train=False, upload=True),
            "the server already knows its value",
        ),
        (lambda: GroupPlan(roles={LORA_B}, source=Source.NODE), "needs a fallback"),
        (
            lambda: GroupPlan(roles={LORA_B}, source=Source.MESSAGE, fallback=Source.ZERO),
            "only applies to source 'node'",
        ),
        (lambda: GroupPlan(roles={LORA_B}, source=Source.ZERO, seed=3), "nothing is drawn from it"),
        (lambda: GroupPlan(roles={"lora_c"}), "selects roles from"),
        (
            lambda: ClientPlan(
                groups=(GroupPlan(roles={LORA_A, OTHER}), GroupPlan(roles={OTHER, LORA_B})), server_round=1
            ),
            r"roles \['other'\] belong to more than one group",
        ),
        (
            lambda: ClientPlan(groups=(GroupPlan(roles={LORA_A}),), server_round=1),
            r"nothing about roles \['lora_b', 'other'\]",
        ),
        (
            lambda: ClientPlan(
                groups=protocol.single_group(source=Source.SEED, seed=1, seed_rank=2), server_round=1, rank=4
            ),
            "seed_rank 2 < the client's rank 4",
        ),
        (lambda: BasePlan(version=1, updates={2: {}}), r"outside versions 1..1"),
    ],
)
def test_inconsistent_plans_are_refused_with_a_reason(build, reason):
    with pytest.raises(ProtocolError, match=reason):
        build()


def tampered(change) -> ConfigRecord:
    record = encode_plan(ClientPlan(groups=protocol.single_group(), server_round=1, rank=2))
    change(record)
    return record


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.__setitem__(protocol.PLAN_VERSION_KEY, 99), "plan version 99"),
        (lambda r: r.__setitem__("lora-init", "fresh"), r"unknown plan keys \['lora-init'\]"),
        (
            lambda r: r.__setitem__(protocol.GROUPS, json.dumps([{"roles": list(ALL_ROLES), "source": "teleport"}])),
            "unknown source",
        ),
        (
            lambda r: r.__setitem__(protocol.GROUPS, json.dumps([{"roles": list(ALL_ROLES), "colour": "red"}])),
            r"unknown group fields \['colour'\]",
        ),
        (lambda r: r.__setitem__(protocol.EVALUATE, "everything"), "unknown evaluate target"),
        (
            lambda r: r.__setitem__(protocol.GROUPS, json.dumps([{"roles": list(ALL_ROLES), "source": "seed"}])),
            "without a seed",
        ),
        (lambda r: r.__delitem__(protocol.SERVER_ROUND), "has no 'server-round'"),
    ],
)
def test_decoding_refuses_unknown_or_inconsistent_plans(change, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_plan(tampered(change))


def test_an_evaluate_message_may_not_train():
    content = encode_instruction(RUN, ClientPlan(groups=protocol.single_group(), server_round=1), {})
    with pytest.raises(ProtocolError, match="evaluate message's plan trains"):
        decode_instruction(content, evaluate_only=True)
    quiet = ClientPlan(
        groups=protocol.single_group(train=False, upload=False), server_round=1, evaluate=Evaluate.GLOBAL
    )
    assert decode_instruction(encode_instruction(RUN, quiet, {}), evaluate_only=True).plan == quiet


def test_replies_without_tensors_or_metrics_are_refused():
    with pytest.raises(ProtocolError, match="no 'arrays' record"):
        protocol.decode_reply(protocol.encode_reply(None, {"num-examples": 3}))
    hello = protocol.NodeHello(partition_id=2, rank=4, num_examples=17)
    assert protocol.decode_query_reply(protocol.encode_query_reply(hello)) == hello
