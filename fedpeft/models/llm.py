"""Big causal LMs on one device: dtype, a quantized base, gradient checkpointing, attention kernel.

(The tiny random-init Llama that runs the whole LLM path offline is an embedded model:
:mod:`fedpeft.models.paths`.)

``model.quantization=4bit|8bit`` is QLoRA: the frozen base is loaded by bitsandbytes (NF4 with
double quantization and compute in ``model.dtype``, or LLM.int8) and prepared with peft's
``prepare_model_for_kbit_training``; the LoRA factors stay float32 (peft upcasts adapters of a
low-precision base), so what travels, what the server aggregates and the saved adapter are full
precision. A quantized base cannot absorb a merge (``W + ΔW`` is not representable in 4 bits
without requantising, which changes every other weight), so a strategy that moves the base is
refused at start (:func:`check_quantized_base`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig

from fedpeft.config.schema import Config, ModelConfig

QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class LLMConfigError(ValueError):
    """A model option that cannot work on this machine or with this rule; the message says why."""


# ------------------------------------------------------------------------------ checks
def check_llm_options(cfg: ModelConfig, *, device: torch.device) -> None:
    """Fail at start on a dtype, quantization or attention setting this machine cannot run."""
    if cfg.dtype not in DTYPES:
        raise LLMConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.quantization not in QUANTIZATIONS:
        raise LLMConfigError(f"model.quantization must be one of {QUANTIZATIONS}, got {cfg.quantization!r}")
    if cfg.quantization != "none":
        if cfg.task != "causal_lm":
            raise LLMConfigError(f"model.quantization={cfg.quantization} is for causal LMs (model.task=causal_lm)")
        if device.type != "cuda":
            raise LLMConfigError(
                f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes' quantized kernels), "
                f"but the run's device is {device.type!r}; set model.quantization=none on this machine"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LLMConfigError(
                f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'fedpeft[qlora]' (or bitsandbytes)"
            )
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise LLMConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package; use 'sdpa' or leave it unset"
        )


def check_quantized_base(
    cfg: ModelConfig, *, rule: str, moves_base: bool, fixed_base_rules: tuple[str, ...] = ()
) -> None:
    """A quantized base cannot absorb merged updates: refuse a rule that moves the base, naming those that do not."""
    if cfg.quantization != "none" and moves_base:
        raise LLMConfigError(
            f"strategy {rule!r} merges each round's update into the base weights, but model.quantization={cfg.quantization} "
            "keeps the base quantized and a quantized base cannot absorb a merge (W + ΔW is not representable without "
            f"requantising every weight); use model.quantization=none or a rule that keeps the base fixed ({', '.join(fixed_base_rules) or 'moves_base=False'})"
        )


# ------------------------------------------------------------------------------ loading
def from_pretrained_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for the model options."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization != "none":
        compute = DTYPES[cfg.dtype] if cfg.dtype != "float64" else torch.float32
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # bitsandbytes places the weights itself
    return kwargs


def prepare_for_training(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """peft's k-bit preparation for a quantized base, and gradient checkpointing when asked."""
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointed blocks
    if cfg.gradient_checkpointing and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ weights and data on this machine
class MissingAsset(LLMConfigError):
    """Weights or data named by a hub id are neither cached here nor reachable."""


def _is_hub_id(name: str | None) -> bool:
    if not name or name.startswith(("embedded:", ".", "/", "~")) or name == "test-split":
        return False
    return not Path(name).expanduser().exists() and Path(name).suffix.lower() not in {".json", ".jsonl", ".csv"}


def hub_available(repo_id: str, *, repo_type: str, timeout: float = 5.0) -> bool:
    """Whether ``repo_id`` is in the local Hugging Face cache, or the hub answers for it."""
    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
        return True
    except Exception:  # no network, unknown repo, gated repo: all mean "not usable from here"
        return False


def check_assets(cfg: Config) -> None:
    """Fail at start, in one line, when a hub id the run needs is neither cached nor reachable:
    say what to download and which override points at a local copy."""
    wanted = [
        (cfg.model.name_or_path, "model", "model.name_or_path", "<folder>"),
        (cfg.data.name, "dataset", "data.name", "<file.jsonl>"),
    ]
    evaluation = getattr(cfg, "evaluation", None)
    if evaluation is not None:
        wanted += [
            (evaluation.mc.name, "dataset", "evaluation.mc.name", "<file.jsonl>"),
            (evaluation.generation.name, "dataset", "evaluation.generation.name", "<file.jsonl>"),
        ]
    for name, repo_type, override, local in wanted:
        if _is_hub_id(name) and not hub_available(name, repo_type=repo_type):
            flag = " --repo-type dataset" if repo_type == "dataset" else ""
            raise MissingAsset(
                f"{override}={name!r} is not on this machine and the Hugging Face hub is not reachable: "
                f"download it (huggingface-cli download{flag} {name} --local-dir <folder>) and set {override}={local}"
            )
