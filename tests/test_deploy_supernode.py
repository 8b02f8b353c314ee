"""``python -m fedpeft.deploy supernode``: a node config the node cannot use is refused in one line,
before ``flower-supernode`` starts (the real start is in tests/test_deploy.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedpeft.engines.deploy.nodes import NodeConfigError, supernode_command
from tests.conftest import REPO


@pytest.fixture
def node_dirs(tmp_path):
    data, state = tmp_path / "data", tmp_path / "state"
    (data / "sports").mkdir(parents=True)
    (data / "sports" / "0.txt").write_text("a match")
    state.mkdir()
    return data, state


def args(node_config: str, *extra: str) -> list[str]:
    return ["--superlink", "127.0.0.1:9092", "--insecure", "--node-config", node_config, *extra]


def test_a_usable_node_config_starts_flower_supernode_with_the_same_arguments(node_dirs):
    data, state = node_dirs
    argv = args(f"partition-id=0 data-path='{data}' state-dir='{state}' rank=4", "--port", "9094")
    cmd = supernode_command(argv)
    assert os.path.basename(cmd[0]) == "flower-supernode" and cmd[1:] == argv


@pytest.mark.parametrize(
    "node_config, message",
    [
        ("partition-id=0 data-path='{tmp}/nope' state-dir='{state}'", "data-path '{tmp}/nope' does not exist"),
        ("partition-id=0 data-path='{tmp}/empty' state-dir='{state}'", "is an empty folder"),
        (
            "partition-id=0 data-path='{data}' state-dir='{tmp}/missing'",
            "state-dir '{tmp}/missing' does not exist (create it",
        ),
        ("partition-id=0 data-path='{data}' state-dir='{data}/sports/0.txt'", "is not a folder"),
        ("partition-id=0 data-path='{data}'", "no state-dir"),
        ("data-path='{data}' state-dir='{state}'", "no partition-id"),
        ("partition-id=-1 state-dir='{state}'", "partition-id must be an integer >= 0, got -1"),
        ("partition-id=0 state-dir='{state}' rank=0", "rank must be an integer >= 1"),
    ],
)
def test_a_node_config_the_node_cannot_use_is_refused(node_dirs, node_config, message):
    data, state = node_dirs
    tmp = data.parent
    (tmp / "empty").mkdir()
    fill = {"tmp": tmp, "data": data, "state": state}
    with pytest.raises(NodeConfigError) as err:
        supernode_command(args(node_config.format(**fill)))
    assert message.format(**fill) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_data_path_is_refused(node_dirs):
    data, state = node_dirs
    data.chmod(0)
    try:
        with pytest.raises(NodeConfigError, match="is not readable"):
            supernode_command(args(f"partition-id=0 data-path='{data}' state-dir='{state}'"))
    finally:
        data.chmod(0o755)


def test_the_command_refuses_in_one_line_without_starting_the_node(node_dirs):
    data, state = node_dirs
    cmd = [
        sys.executable,
        "-m",
        "fedpeft.deploy",
        "supernode",
        *args(f"partition-id=0 data-path='{data}/nope' state-dir='{state}'"),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"fedpeft.deploy supernode: refusing to start: data-path '{data}/nope' does not exist\n"
