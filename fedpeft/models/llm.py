"""Big causal LMs on one device: dtype, a quantized base, gradient checkpointing, attention kernel;
and the tiny random-init Llama that runs the whole LLM path offline.

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
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.config.schema import ModelConfig

TINY_LLAMA = "embedded:tiny-llama"
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# A chat template for the MiniLM (BERT word-piece, lower-casing) tokenizer: [CLS] opens the
# conversation, [SEP] closes every turn (and is the EOS the generation stops at).
MINILM_CHAT_TEMPLATE = (
    "[CLS]{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The tiny Llama: 2 layers, width 128, MiniLM's 30,522-token vocabulary, tied embeddings (4.3 M parameters).
TINY_LLAMA_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
# The (tied) embeddings are drawn wider than the other weights: the head's logits are the final
# RMS-normalised state (norm ~ sqrt(width)) times an embedding row, and at std 0.02 no hidden state
# could give a token more than a few percent of the probability, so loss could hardly fall.
TINY_LLAMA_EMBEDDING_STD = 0.2


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
            raise LLMConfigError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'fedpeft[qlora]' (or bitsandbytes)")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise LLMConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package; use 'sdpa' or leave it unset")


def check_quantized_base(cfg: ModelConfig, *, rule: str, moves_base: bool, fixed_base_rules: tuple[str, ...] = ()) -> None:
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
        from transformers import BitsAndBytesConfig

        compute = DTYPES[cfg.dtype] if cfg.dtype != "float64" else torch.float32
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # bitsandbytes places the weights itself
    return kwargs


def prepare_for_training(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """peft's k-bit preparation for a quantized base, and gradient checkpointing when asked."""
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointed blocks
    if cfg.gradient_checkpointing and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


# ------------------------------------------------------------------------------ the tiny Llama
def cache_root() -> Path:
    """``$FEDPEFT_CACHE``, else ``$XDG_CACHE_HOME/fedpeft``, else ``~/.cache/fedpeft``."""
    if os.environ.get("FEDPEFT_CACHE"):
        return Path(os.environ["FEDPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "fedpeft"


def minilm_chat_tokenizer():
    """The embedded MiniLM tokenizer with :data:`MINILM_CHAT_TEMPLATE`, [CLS] as BOS and [SEP] as EOS."""
    from transformers import AutoTokenizer

    from fedpeft.models.adapters import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:minilm"))
    tokenizer.chat_template = MINILM_CHAT_TEMPLATE
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    return tokenizer


def tiny_llama_path(root: Path | None = None, *, seed: int = 0) -> Path:
    """The tiny random-init Llama and its tokenizer as a plain transformers folder, built on first use.

    The folder name carries a hash of the architecture and seed, so a changed recipe never reuses
    an old folder; it is written to a temporary folder and renamed, so two processes building it
    at once both end with a complete copy.
    """
    recipe = json.dumps(
        {"config": TINY_LLAMA_CONFIG, "embedding_std": TINY_LLAMA_EMBEDDING_STD, "seed": seed, "template": MINILM_CHAT_TEMPLATE, "v": 1}, sort_keys=True
    )
    target = (root or cache_root()) / f"tiny-llama-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = minilm_chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, TINY_LLAMA_EMBEDDING_STD)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-llama-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

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


def check_assets(cfg: Any) -> None:
    """Fail at start, in one line, when a hub id the run needs is neither cached nor reachable:
    say what to download and which override points at a local copy."""
    wanted = [(cfg.model.name_or_path, "model", "model.name_or_path", "<folder>"), (cfg.data.name, "dataset", "data.name", "<file.jsonl>")]
    evaluation = getattr(cfg, "evaluation", None)
    if evaluation is not None:
        wanted += [(evaluation.mc.name, "dataset", "evaluation.mc.name", "<file.jsonl>"), (evaluation.generation.name, "dataset", "evaluation.generation.name", "<file.jsonl>")]
    for name, repo_type, override, local in wanted:
        if _is_hub_id(name) and not hub_available(name, repo_type=repo_type):
            flag = " --repo-type dataset" if repo_type == "dataset" else ""
            raise MissingAsset(
                f"{override}={name!r} is not on this machine and the Hugging Face hub is not reachable: "
                f"download it (huggingface-cli download{flag} {name} --local-dir <folder>) and set {override}={local}"
            )
