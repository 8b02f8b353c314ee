"""python -m fedpeft.generate: a saved adapter on the tiny Llama, loaded with plain transformers + peft."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, TaskType, get_peft_model

from fedpeft import generate
from fedpeft.config.schema import Config, DataConfig, ModelConfig
from fedpeft.models import paths


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory as a finished run leaves it: config.yaml and final_adapter/ (B non-zero)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    cfg = Config(
        model=ModelConfig(name_or_path=paths.TINY_LLAMA, task="causal_lm", max_length=48),
        data=DataConfig(format="alpaca", system_prompt="Answer briefly."),
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    path = paths.tiny_llama_path()
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type=TaskType.CAUSAL_LM),
    )
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    model.save_pretrained(run / "final_adapter")
    return run, cfg, model.eval(), AutoTokenizer.from_pretrained(path)


def test_generate_loads_the_adapter_and_matches_the_in_memory_model(run_dir, capsys, tmp_path):
    run, cfg, model, tokenizer = run_dir
    prompts = [
        {"prompt": "which topic is this article about?"},
        {"instruction": "summarise", "input": "the match ended two all"},
    ]
    expected = generate.generate_texts(
        cfg, model, tokenizer, [generate.prompt_row(p, line=1) for p in prompts], max_new_tokens=5
    )
    # What load_run loads is the adapter: its logits are the in-memory model's, not the base's.
    _, loaded, _ = generate.load_run(run)
    ids = torch.tensor([tokenizer("the match ended two all", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        with model.disable_adapter():
            assert not torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)

    assert generate.main([str(run), prompts[0]["prompt"], "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps(p) for p in prompts))
    assert generate.main([str(run), "--file", str(file), "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["output"] for line in lines] == expected and lines[1]["input"] == "the match ended two all"


def test_a_directory_without_a_final_model_is_named(run_dir):
    import shutil

    run = run_dir[0]
    shutil.rmtree(run / "final_adapter")
    with pytest.raises(generate.GenerateError, match="neither final_adapter/ nor final_model/"):
        generate.load_run(run)
    with pytest.raises(generate.GenerateError, match="not a run directory"):
        generate.load_run(run / "nowhere")
