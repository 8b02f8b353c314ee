"""Every mistake a run can know about before Ray starts stops it there, with one message naming it.

Each case is a config a new user typed (issue 11), composed as ``python -m fedpeft.run`` would.
"""

from __future__ import annotations

import json

import pytest

from fedpeft.cli.checks import check_config, check_model, check_resources, check_run
from fedpeft.cli.configs import compose_config
from fedpeft.config.schema import ConfigError
from fedpeft.data.sources import DataError

SMOKE = ["+exp=smoke"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["eval_every=0"], "eval_every must be >= 1, got 0"),
        (["client.batch_size=0"], "client.batch_size must be >= 1, got 0"),
        (["client.lr=-1"], "client.lr must be > 0, got -1.0"),
        (["client.local_steps=-1"], "client.local_steps must be > 0"),
        (
            ["client.local_steps=0", "client.local_epochs=0"],
            "client.local_epochs epochs, which must then be >= 1, got 0",
        ),
        (["client.dp.target_epsilon=1"], r"client.dp.target_epsilon=1.0 has no effect: DP is off. Add client=dp"),
        (
            ["client.dp.noise_multiplier=1.0", "client.dp.max_grad_norm=2"],
            r"client.dp.noise_multiplier=1.0 client.dp.max_grad_norm=2.0 has no effect",
        ),
        (
            ["client=dp", "client.dp.grad_sample_mode=foo"],
            r"client.dp.grad_sample_mode must be one of \('lora', 'opacus', 'loop'\), got 'foo'",
        ),
        (["client=dp", "client.dp.accountant=moments"], r"client.dp.accountant must be one of"),
        (["client=dp", "client.dp.noise_multiplier=1.0"], "exactly one of noise_multiplier and target_epsilon"),
        (["client=dp", "client.dp.delta=0"], r"client.dp.delta must be in \(0, 1\)"),
        (["model.max_length=0"], "model.max_length must be >= 1"),
        (["model.lora.target_modules=[]"], "model.lora.target_modules is empty"),
        (["round_timeout=0"], "round_timeout must be > 0"),
        (
            ["model.peft=ia3", "client=dp"],
            "grad_sample_mode=lora computes per-sample gradients of LoRA layers only; model.peft=ia3 needs grad_sample_mode=loop",
        ),
        (["model.autocast=float8"], r"model.autocast='float8': choose one of \['bfloat16'\] or null"),
        (["model.autocast=bfloat16", "model.dtype=bfloat16"], "autocast is mixed precision over a float32 base"),
        (
            ["model.autocast=bfloat16", "client=dp", "client.dp.grad_sample_mode=opacus"],
            "Opacus' hooks would compute the per-sample gradients in bf16; use grad_sample_mode=lora or loop",
        ),
        (
            ["deploy.superlink=10.0.0.1:9443"],
            "deploy.superlink=10.0.0.1:9443 has no effect with mode=simulation: add mode=deploy",
        ),
    ],
)
def test_config_mistakes_fail_before_anything_starts(overrides, fragment):
    cfg = compose_config([*SMOKE, *overrides])
    with pytest.raises(ConfigError, match=fragment):
        check_config(cfg)


def test_dp_turned_off_on_purpose_is_allowed():
    """``client=dp client.dp.enabled=false`` (the no-DP reference of a DP sweep) keeps its DP settings, unused."""
    check_config(compose_config([*SMOKE, "client=dp", "client.dp.enabled=false"]))


@pytest.mark.parametrize("mode", ["lora", "loop"])
def test_dp_under_autocast_is_allowed_where_per_sample_gradients_are_float32(mode):
    check_config(compose_config([*SMOKE, "client=dp", f"client.dp.grad_sample_mode={mode}", "model.autocast=bfloat16"]))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data=local"], r"data.name is required by the chosen config: add data.name=<value>"),
        (["model=hf_causal_lm"], r"model.name_or_path is required .*add model.name_or_path=<value>"),
    ],
)
def test_a_required_value_does_not_fall_back_to_the_default(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        compose_config(overrides)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["model.lora.target_modules=[query,valu]"],
            r"model.lora.target_modules \['valu'\] match no module of 'embedded:minilm'; its linear layers are named \[.*'value'",
        ),
        (
            ["model.lora.r=1000"],
            r"LoRA rank 1000 exceeds the smallest adapted dimension, 384 \(.*query is \(384, 384\)\); use ranks <= 384",
        ),
        (["strategy.ranks=[4,500,2]"], r"LoRA rank 500 exceeds the smallest adapted dimension, 384"),
        (["model.max_length=100000"], r"model.max_length=100000 exceeds the 512 positions of model 'embedded:minilm'"),
        (["model.lora.modules_to_save=[head]"], r"modules_to_save entry 'head' matches no module"),
    ],
)
def test_model_mistakes_are_found_on_the_architecture(overrides, fragment):
    cfg = compose_config([*SMOKE, *overrides])
    with pytest.raises(ConfigError, match=fragment):
        check_model(cfg)


def test_every_default_and_experiment_model_passes():
    check_model(compose_config([*SMOKE]))
    check_model(compose_config(["+exp=flora_hetero"]))


def test_resources_the_machine_lacks():
    with pytest.raises(ConfigError, match="client.num_cpus=8 but this machine has 2 CPU cores: no client could start"):
        check_resources(compose_config(["client.num_cpus=8"]), cpus=2, gpus=0)
    with pytest.raises(ConfigError, match="client.num_gpus=0.25 but this machine has no CUDA GPU"):
        check_resources(compose_config(["client.num_gpus=0.25"]), cpus=2, gpus=0)
    check_resources(compose_config(["client.num_cpus=2", "client.num_gpus=0.25"]), cpus=2, gpus=1)
    check_resources(compose_config(["client.num_cpus=8", "mode=centralized"]), cpus=2, gpus=0)  # no Ray actor to place


# ------------------------------------------------------------------------------ data files
def _rows(n: int = 20) -> list[dict]:
    return [
        {"text": f"document {i} about {'cats' if i % 2 else 'dogs'}", "label": "cats" if i % 2 else "dogs"}
        for i in range(n)
    ]


def _write(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.jsonl", "", r"data file '.*empty.jsonl' is empty"),
        ("empty.csv", "", r"data file '.*empty.csv' is empty"),
        ("header.csv", "text,label\n", r"data file '.*header.csv' has no examples"),
        ("blank.jsonl", "\n\n  \n", r"data file '.*blank.jsonl' holds only whitespace"),
        ("latin1.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in _rows()).replace("document 3", "caf\u00e9 3").encode("latin-1"),
         r"data file '.*latin1.jsonl' is not UTF-8 text \(byte 0xe9 at offset \d+\)"),
        ("model.csv", b"PK\x03\x04\x00\x00binary", r"data file '.*model.csv' is binary \(a NUL byte at offset 4\)"),
        ("null.jsonl", "\n".join(json.dumps({**r, "text": None if i == 5 else r["text"]}) for i, r in enumerate(_rows())),
         r"1 of 20 examples have an empty or missing 'text' \(the first is row 5\)"),
        ("empty_text.csv", "text,label\n" + "\n".join(f"{'' if i == 2 else r['text']},{r['label']}" for i, r in enumerate(_rows())),
         r"1 of 20 examples have an empty or missing 'text' \(the first is row 2\)"),
        ("broken.json", '[{"text": "a", "label": 1}, {"text": ', r"cannot read data file '.*broken.json' as JSON"),
    ],
)  # fmt: skip
def test_data_files_fail_with_their_name(tmp_path, name, content, fragment):
    path = _write(tmp_path / name, content)
    cfg = compose_config([*SMOKE, "data=local", f"data.name={path}", "data.max_samples=null"])
    with pytest.raises(DataError, match=fragment):
        check_run(cfg)


def test_a_binary_or_empty_document_in_a_text_folder_is_named(tmp_path):
    for i, r in enumerate(_rows()):
        (tmp_path / "docs" / r["label"]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / r["label"] / f"{i}.txt").write_text(r["text"])
    (tmp_path / "docs" / "cats" / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cfg = compose_config([*SMOKE, "data=local", f"data.name={tmp_path / 'docs'}", "data.max_samples=null"])
    with pytest.raises(DataError, match=r"data file '.*cats/photo.txt' is binary"):
        check_run(cfg)
    (tmp_path / "docs" / "cats" / "photo.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"text file '.*cats/photo.txt' is empty"):
        check_run(cfg)
