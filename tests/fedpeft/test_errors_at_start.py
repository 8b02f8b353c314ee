"""Each mistake stops the run before any training, with one clear message, and writes no results."""

from __future__ import annotations

import pytest

from fedpeft.config.schema import ConfigError
from fedpeft.data.sources import DataError
from fedpeft.models.paths import ModelError
from fedpeft.privacy.accounting import DPError
from fedpeft.run import execute
from tests.fedpeft.test_config import compose_cfg


@pytest.mark.parametrize(
    "overrides, error, fragment",
    [
        (["data.name=/no/such/corpus"], DataError, "data path '/no/such/corpus' does not exist"),
        (
            ["strategy.name=fedsgd"],
            ValueError,
            "unknown strategy 'fedsgd'; valid: \\['fedavg', 'fedex_lora', 'fedsa_lora', 'fedsvd', 'ffa_lora', 'flexlora', 'flora', 'hetlora', 'lora_fair', 'rolora'\\]",
        ),
        (["strategy.ranks=[4,2]"], ValueError, "strategy.ranks has 2 entries but num_clients is 3"),
        (
            ["strategy=fedex_lora", "strategy.ranks=[4,2,1]"],
            ValueError,
            r"fedex_lora needs the same LoRA rank on every client, got ranks \[1, 2, 4\]",
        ),
        (["model.name_or_path=./models/missing"], ModelError, "model path './models/missing' does not exist"),
        (["client=dp", "client.dp.target_epsilon=0.001"], DPError, "unreachable.*smallest reachable ε is"),
        (
            ["client=dp", "client.dp.noise_multiplier=1.0"],
            ConfigError,
            "exactly one of noise_multiplier and target_epsilon",
        ),
        (["data.label_column=topic", "data.name=embedded:bbc"], DataError, "no column 'topic'"),
        (
            ["client=dp", "model.dtype=float16"],
            ConfigError,
            "model.dtype=float16 with client.dp.*use model.dtype=bfloat16",
        ),
        (["engine=batched", "model.dtype=float16"], ConfigError, "model.dtype=float16 with engine=batched"),
        (["mode=local", "client=dp"], ConfigError, "mode=local trains without it"),
        (["mode=deploy"], ValueError, "mode=deploy uses TLS: set deploy.root_certificates"),
        (
            ["mode=deploy", "deploy.root_certificates=/no/ca.crt"],
            ValueError,
            "deploy.root_certificates: no such file '/no/ca.crt'",
        ),
        (
            ["mode=deploy", "deploy.superlink=superlink.lan", "deploy.insecure=true"],
            ValueError,
            "deploy.superlink must be host:port",
        ),
    ],
)
def test_error_at_start(tmp_path, overrides, error, fragment):
    with pytest.raises(error, match=fragment):
        execute(compose_cfg(["+exp=smoke", *overrides]), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
