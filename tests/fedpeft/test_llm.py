"""Model options for big LMs (dtype, 4-bit gate, gradient checkpointing) and the tiny Llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict

from fedpeft.config.schema import ModelConfig
from fedpeft.models import llm, paths

CAUSAL = ModelConfig(name_or_path="embedded:tiny-llama", task="causal_lm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_without_cuda_fails_at_start_with_the_reason(bits):
    with pytest.raises(
        llm.LLMConfigError, match=rf"model.quantization={bits} needs a CUDA GPU.*set model.quantization=none"
    ):
        llm.check_llm_options(dataclasses.replace(CAUSAL, quantization=bits), device=torch.device("cpu"))


def test_bad_options_are_named():
    with pytest.raises(llm.LLMConfigError, match="model.quantization must be one of"):
        llm.check_llm_options(dataclasses.replace(CAUSAL, quantization="3bit"), device=torch.device("cpu"))
    with pytest.raises(llm.LLMConfigError, match="model.dtype must be one of"):
        llm.check_llm_options(dataclasses.replace(CAUSAL, dtype="fp8"), device=torch.device("cpu"))
    llm.check_llm_options(dataclasses.replace(CAUSAL, dtype="bfloat16"), device=torch.device("cpu"))


def test_a_rule_that_moves_the_base_is_refused_on_a_quantized_base():
    quantized = dataclasses.replace(CAUSAL, quantization="4bit")
    with pytest.raises(llm.LLMConfigError, match="cannot absorb a merge"):
        llm.check_quantized_base(quantized, rule="some_rule", moves_base=True)
    llm.check_quantized_base(quantized, rule="some_rule", moves_base=False)
    llm.check_quantized_base(CAUSAL, rule="some_rule", moves_base=True)


def test_4bit_kwargs_ask_for_nf4_with_the_compute_dtype():
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("device_map needs CUDA")
    kwargs = llm.from_pretrained_kwargs(dataclasses.replace(CAUSAL, quantization="4bit", dtype="bfloat16"))
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16


def test_tiny_llama_is_built_once_and_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = paths.tiny_llama_path(tmp_path)
    assert paths.tiny_llama_path(tmp_path) == path and len(list(tmp_path.iterdir())) == 1
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template == paths.MINILM_CHAT_TEMPLATE and tokenizer.eos_token == "[SEP]"
    # Same recipe, same weights: a second cache folder holds a bit-identical model.
    again = AutoModelForCausalLM.from_pretrained(paths.tiny_llama_path(tmp_path / "other"))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def lora(model):
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # a fresh B is zero, which would hide a wrong gradient
    return peft_model


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    ids = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama().double()
        model = llm.prepare_for_training(model, dataclasses.replace(CAUSAL, gradient_checkpointing=checkpointing))
        peft_model = lora(model)
        peft_model.train()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        assert model.is_activation_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12)


def test_a_bfloat16_base_keeps_float32_lora_factors():
    peft_model = lora(tiny_llama(torch.bfloat16))
    state = get_peft_model_state_dict(peft_model)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert next(p for n, p in peft_model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16


def test_a_float16_base_gets_a_loss_scaler_and_trains():
    from fedpeft.training.local import loss_scaler, train_local

    assert (
        loss_scaler(lora(tiny_llama()), "cpu") is None and loss_scaler(lora(tiny_llama(torch.bfloat16)), "cpu") is None
    )
    peft_model = lora(tiny_llama(torch.float16))
    assert loss_scaler(peft_model, "cpu") is not None
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    result = train_local(peft_model, batches, num_steps=3, lr=1e-2)
    assert torch.isfinite(torch.tensor(result.loss)) and result.skipped_steps < 3
    assert all(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_loss_scaling_rescues_the_gradients_a_float16_base_would_underflow():
    """A loss of order 1e-6 (late in training, or a small per-token weight): its gradients through the
    float16 activations flush to zero unless scaled; scaled and unscaled they match float64."""
    import copy

    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    tiny = 1e-6
    half = lora(tiny_llama(torch.float16))

    def lora_grads(model, scale=1.0):
        model = copy.deepcopy(model)
        (model(input_ids=ids, labels=ids).loss.float() * tiny * scale).backward()
        return torch.cat(
            [
                p.grad.double().flatten() / scale
                for n, p in model.named_parameters()
                if "layers.0" in n and "lora_A" in n
            ]
        )

    exact = lora_grads(copy.deepcopy(half).double())  # the same weights, computed in float64
    unscaled, scaled = lora_grads(half), lora_grads(half, scale=2.0**16)

    def err(g):
        return ((g - exact).norm() / exact.norm()).item()

    assert err(scaled) < 0.05 < err(unscaled)


@pytest.mark.parametrize("exp", ["flora_dolly", "fedit_alpaca", "ffa_lora_gsm8k_dp"])
def test_paper_experiments_without_weights_or_data_fail_at_start_in_one_line(exp, tmp_path, monkeypatch):
    from fedpeft.cli.configs import compose_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    cfg = compose_config([f"+exp={exp}"])
    with pytest.raises(
        llm.MissingAsset,
        match=r"model.name_or_path='TinyLlama/TinyLlama_v1.1' is not on this machine.*huggingface-cli download TinyLlama/TinyLlama_v1.1 .*set model.name_or_path=<folder>",
    ) as err:
        llm.check_assets(cfg)
    assert "\n" not in str(err.value)
    local_model = str(paths.tiny_llama_path(tmp_path))
    data = tmp_path / "data.jsonl"
    data.write_text("{}")
    cfg = compose_config([f"+exp={exp}", f"model.name_or_path={local_model}"])
    with pytest.raises(llm.MissingAsset, match=r"set data.name=<file.jsonl>"):
        llm.check_assets(cfg)
    cfg = compose_config([f"+exp={exp}", f"model.name_or_path={local_model}", f"data.name={data}"])
    with pytest.raises(
        llm.MissingAsset, match=r"--repo-type dataset .* set evaluation.(mc|generation).name=<file.jsonl>"
    ):
        llm.check_assets(cfg)
    cfg = compose_config(
        [
            f"+exp={exp}",
            f"model.name_or_path={local_model}",
            f"data.name={data}",
            f"evaluation.mc.name={data}",
            f"evaluation.generation.name={data}",
        ]
    )
    llm.check_assets(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_logits_only_where_labelled_equal_the_full_logits(build):
    from fedpeft.data.encoding import Collator
    from fedpeft.training.local import shifted_lm_logits

    model = build().double().eval()
    examples = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "attention_mask": [1] * 6, "labels": [-100, -100, -100, -100, 9, 10]},
        {"input_ids": [3, 4, 11], "attention_mask": [1] * 3, "labels": [-100, 4, 11]},
    ]
    batch = Collator(0)(examples)
    logits, targets = shifted_lm_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    kept = [0, 1, 3, 4]  # positions predicting a labelled token in some row
    assert logits.shape[1] == len(kept) < full.shape[1]
    torch.testing.assert_close(logits, full[:, kept], rtol=1e-12, atol=1e-12)
    assert targets.tolist() == [[-100, -100, 9, 10], [4, 11, -100, -100]]


def test_rules_declare_whether_they_move_the_base_and_a_quantized_base_refuses_those_that_do():
    import inspect

    from fedpeft.strategies import STRATEGIES

    for name, rule in STRATEGIES.items():
        # The declaration the start check reads agrees with the code: a rule that merges says so.
        assert rule.moves_base == ("merge_into_base(" in inspect.getsource(rule)), name
    quantized = dataclasses.replace(CAUSAL, quantization="4bit")
    movers = [n for n, r in STRATEGIES.items() if r.moves_base]
    assert movers == ["flora", "fedex_lora"]
    with pytest.raises(llm.LLMConfigError, match="'flora' merges each round's update into the base"):
        llm.check_quantized_base(quantized, rule="flora", moves_base=STRATEGIES["flora"].moves_base)
    llm.check_quantized_base(quantized, rule="fedavg", moves_base=STRATEGIES["fedavg"].moves_base)
