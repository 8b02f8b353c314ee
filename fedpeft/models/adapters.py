"""Base model loading, LoRA wrapping and the per-process model cache.

A worker process (a Ray actor in simulation, the server process, a benchmark) loads the frozen base
model once and keeps it: clients only swap adapter tensors in and out. Ranks are adapters of the
same PEFT model (``r8``, ``r4``, ...), so heterogeneous-rank clients share one base too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

from fedpeft.config.schema import Config, LoraSettings, ModelConfig
from fedpeft.models.llm import from_pretrained_kwargs, prepare_for_training
from fedpeft.models.paths import ModelError, resolve_model_path
from fedpeft.protocol.records import exact_product
from fedpeft.protocol.wire import LORA_A, LORA_B, OTHER
from fedpeft.training.local import AUTOCAST, AUTOCAST_DTYPES

log = logging.getLogger(__name__)
# transformers prints a load report for every fresh head ("classifier: MISSING"): expected here.
hf_logging.set_verbosity_error()

TASKS = ("seq_cls", "causal_lm")
PEFT_METHODS = ("lora", "dora", "ia3", "prompt_tuning")
RANKED = ("lora", "dora")
PROMPT_KEY = "prompt_embeddings"  # the state-dict key of a prompt-learning adapter (peft's own name)  # the methods whose adapters have a rank (LoRA factors)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# How many times this process loaded base weights from disk: once per process when the model cache
# works (the end-to-end tests check it in the worker; it never travels in a reply).
BASE_MODEL_LOADS = 0
_MODELS: dict[tuple, CachedModel] = {}
_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}
_LOCK = threading.Lock()


def check_model_config(cfg: ModelConfig) -> None:
    """Fail fast (before Ray starts) on a bad model section."""
    if cfg.task not in TASKS:
        raise ModelError(f"model.task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.dtype not in _DTYPES:
        raise ModelError(f"model.dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.peft not in PEFT_METHODS:
        raise ModelError(f"model.peft must be one of {PEFT_METHODS}, got {cfg.peft!r}")
    if cfg.lora.r < 1:
        raise ModelError(f"model.lora.r must be >= 1, got {cfg.lora.r}")
    try:
        peft_config(cfg, rank=cfg.lora.r if has_ranks(cfg) else None)
    except (TypeError, ValueError) as err:
        raise ModelError(f"model.peft={cfg.peft} with model.peft_options={dict(cfg.peft_options)}: {err}") from None
    resolve_model_path(cfg.name_or_path)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    key = cfg.name_or_path
    with _LOCK:
        if key not in _TOKENIZERS:
            tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path))
            if tok.pad_token is None:  # causal LMs often ship without one
                tok.pad_token = tok.eos_token
            _TOKENIZERS[key] = tok
        return _TOKENIZERS[key]


def load_base_model(cfg: ModelConfig, *, num_labels: int) -> PreTrainedModel:
    """Load the frozen base weights from disk (counted in ``BASE_MODEL_LOADS``)."""
    global BASE_MODEL_LOADS
    path = resolve_model_path(cfg.name_or_path)
    dtype = _DTYPES[cfg.dtype]
    try:
        if cfg.task == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
        else:  # dtype, quantization and attention kernel from the model config (fedpeft/models/llm.py)
            model = prepare_for_training(AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs(cfg)), cfg)
    except OSError as err:
        raise ModelError(f"cannot load model {cfg.name_or_path!r}: {err}") from err
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    BASE_MODEL_LOADS += 1
    return model


def tier_rank(cfg: Config, tier: str) -> int:
    """The rank of resource tier ``tier`` in ``strategy.tiers`` (the one tier lookup)."""
    tiers = cfg.strategy.tiers or {}
    if str(tier) not in tiers:
        raise ValueError(f"tier {tier!r} is not in strategy.tiers {sorted(tiers)}")
    return int(tiers[str(tier)])


def client_ranks(cfg: Config) -> list[int | None]:
    """The LoRA rank of every client of a :class:`fedpeft.config.schema.Config` (None for a peft method without ranks).

    ``strategy.ranks`` (one per client), else ``strategy.tiers`` looked up through
    ``strategy.client_tiers``, else ``model.lora.r`` for everyone.
    """
    s, n = cfg.strategy, cfg.num_clients
    if not has_ranks(cfg.model):
        if s.ranks is not None or s.client_tiers is not None:
            raise ValueError(
                f"strategy.ranks / strategy.client_tiers set ranks, and model.peft={cfg.model.peft} has none (only {list(RANKED)} do)"
            )
        return [None] * n
    ranks: list[int]
    if s.ranks is not None:
        ranks = list(s.ranks)
        if len(ranks) != n:
            raise ValueError(f"strategy.ranks has {len(ranks)} entries but num_clients is {n}")
    elif s.client_tiers is not None:
        if not s.tiers:
            raise ValueError("strategy.client_tiers needs strategy.tiers (tier name -> rank)")
        if len(s.client_tiers) != n:
            raise ValueError(f"strategy.client_tiers has {len(s.client_tiers)} entries but num_clients is {n}")
        unknown = sorted(set(s.client_tiers) - set(s.tiers))
        if unknown:
            raise ValueError(f"strategy.client_tiers names unknown tiers {unknown}; known: {sorted(s.tiers)}")
        ranks = [tier_rank(cfg, t) for t in s.client_tiers]
    else:
        ranks = [cfg.model.lora.r] * n
    if any(r < 1 for r in ranks):
        raise ValueError(f"LoRA ranks must all be >= 1, got {ranks}")
    return [*ranks]  # as list[int | None]: a list is invariant


def adapter_name(rank: int | None) -> str:
    """The peft adapter of a rank (``r8``, ``r4``, ...); a method without ranks has one, ``default``."""
    return "default" if rank is None else f"r{rank}"


def has_ranks(cfg: ModelConfig) -> bool:
    return cfg.peft in RANKED


def peft_config(cfg: ModelConfig, *, rank: int | None) -> PeftConfig:
    """The peft config of ``cfg.peft`` (at ``rank`` for LoRA and DoRA), from peft's own config classes."""
    task_type = TaskType.SEQ_CLS if cfg.task == "seq_cls" else TaskType.CAUSAL_LM
    options = dict(cfg.peft_options)
    if cfg.peft in RANKED:
        if rank is None:
            raise ValueError(f"model.peft={cfg.peft} needs a rank")
        return lora_config(cfg.lora, rank=rank, task=cfg.task, use_dora=cfg.peft == "dora", **options)
    if cfg.peft == "ia3":
        options.setdefault("target_modules", list(cfg.lora.target_modules))
        options.setdefault("feedforward_modules", [])
        options.setdefault("modules_to_save", list(cfg.lora.modules_to_save) or None)
        return IA3Config(task_type=task_type, **options)
    if cfg.peft == "prompt_tuning":
        options.setdefault("num_virtual_tokens", 8)
        return PromptTuningConfig(task_type=task_type, **options)  # peft trains a seq_cls head itself
    raise ModelError(f"model.peft must be one of {PEFT_METHODS}, got {cfg.peft!r}")


def lora_config(lora: LoraSettings, *, rank: int, task: str, **options) -> LoraConfig:
    """A peft LoraConfig at ``rank`` that keeps the scaling alpha / r of the configured rank."""
    return LoraConfig(
        **options,
        r=rank,
        lora_alpha=lora.alpha * rank / lora.r,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        task_type=TaskType.SEQ_CLS if task == "seq_cls" else TaskType.CAUSAL_LM,
    )


@dataclass
class CachedModel:
    """One base model with one peft adapter per rank (one in all for a method without ranks), living
    for the whole worker process. The adapters are workspaces: a client loads every tensor of its
    adapter before it trains (``fedpeft.clients.job.run_job``), so nothing of one client reaches another, and
    a run's round-0 adapter starts from :meth:`built_state`, never from what earlier jobs left."""

    model: PeftModel
    cfg: ModelConfig
    device: torch.device
    # The base the clients train on may move (a rule may merge each round's update into W). The
    # untouched weights of the adapted modules are kept so any run can start again from W_0.
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    base_lineage: str = ""
    base_version: int = 0
    # Each adapter's tensors as peft built it, by adapter name: the workspace itself holds whatever
    # the last job or evaluation loaded, so a run's initial adapter must not be read from it.
    built: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.model.peft_config:
            self.built.setdefault(name, self._state(name))

    def activate(self, rank: int | None) -> PeftModel:
        name = adapter_name(rank)
        if name not in self.model.peft_config:
            self.model.add_adapter(name, peft_config(self.cfg, rank=rank))
            self.model.to(self.device)
            self.built[name] = self._state(name)
        self.model.set_adapter(name)  # also marks only this adapter's LoRA and head trainable
        return self.model

    def adapter_state(self, rank: int | None) -> dict[str, torch.Tensor]:
        """The trainable tensors (LoRA factors and head) of the rank-``rank`` adapter as they are now, detached on CPU."""
        return self._state(adapter_name(rank))

    def built_state(self, rank: int | None) -> dict[str, torch.Tensor]:
        """The rank-``rank`` adapter's tensors as peft built it (a copy), whatever jobs ran on this model since."""
        self.activate(rank)
        return {k: v.clone() for k, v in self.built[adapter_name(rank)].items()}

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        sd = get_peft_model_state_dict(self.model, adapter_name=name)
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def adapter_template(self, rank: int | None) -> dict[str, torch.Tensor]:
        """The keys, shapes and dtypes of the rank-``rank`` adapter (its current values; read them as a template only)."""
        self.activate(rank)
        return self.adapter_state(rank)

    def set_trainable(self, rank: int | None, roles: set[str]) -> None:
        """Train exactly the rank-``rank`` adapter's tensors whose role (:func:`fedpeft.protocol.wire.key_role`) is in ``roles``."""
        name = adapter_name(rank)
        self.model.set_adapter(name)  # marks this adapter's tensors (LoRA and head) trainable, others frozen
        for pname, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            role = (
                LORA_A
                if pname.endswith(f".lora_A.{name}.weight")
                else LORA_B
                if pname.endswith(f".lora_B.{name}.weight")
                else OTHER
            )
            param.requires_grad_(role in roles)

    def load_adapter_state(self, rank: int | None, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        expected = set(get_peft_model_state_dict(self.model, adapter_name=adapter_name(rank)))
        if strict and set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"adapter state does not match rank-{rank} adapter: missing {missing[:3]}, extra {extra[:3]}"
            )
        result = set_peft_model_state_dict(self.model, state, adapter_name=adapter_name(rank))
        unexpected = getattr(result, "unexpected_keys", [])
        if PROMPT_KEY in state and PROMPT_KEY in unexpected:
            # peft loads a prompt method's embeddings into its prompt encoder itself and still lists
            # the key as unexpected; check that it did, instead of trusting the list.
            encoder = self.model.prompt_encoder[adapter_name(rank)].embedding.weight
            if not torch.equal(encoder.detach().cpu(), state[PROMPT_KEY].to(encoder.dtype)):
                raise ValueError("peft did not load the prompt embeddings")
            unexpected = [k for k in unexpected if k != PROMPT_KEY]
        if unexpected:
            raise ValueError(f"unexpected adapter keys: {unexpected[:3]}")

    def lora_layers(self) -> dict[str, LoraLayer]:
        """Every LoRA-adapted module, by the module name used in adapter keys.

        Adapter keys look like ``base_model.model.<name>.lora_A.weight``; the name returned here is
        ``base_model.model.<name>``, the module part shared with :class:`fedpeft.protocol.records.LoraPair`.
        """
        return {name: module for name, module in self.model.named_modules() if isinstance(module, LoraLayer)}

    def base_layers(self) -> dict[str, nn.Module]:
        """The frozen base layer (``nn.Linear``, GPT-2's ``Conv1D``, ...) of every LoRA-adapted module."""
        return {name: module.get_base_layer() for name, module in self.lora_layers().items()}

    def merged_base(self) -> dict[str, torch.Tensor]:
        """The adapted layers' current base weights (what :meth:`restore_base` takes back)."""
        return {n: m.weight.detach().to("cpu", copy=True) for n, m in self.base_layers().items()}

    def restore_base(self, lineage: str, weights: dict[str, torch.Tensor], *, version: int) -> None:
        """Set the base to saved :meth:`merged_base` weights of ``lineage`` at ``version`` (bit-exact)."""
        layers = self.base_layers()
        if set(weights) != set(layers):
            raise ValueError(f"saved base has layers {sorted(weights)[:2]}..., the model {sorted(layers)[:2]}...")
        self.pristine = self.pristine or self.merged_base()
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.copy_(weights[name].to(layer.weight.device, layer.weight.dtype))
        self.base_lineage, self.base_version = lineage, version

    def use_base(self, lineage: str, deltas: list[dict[str, torch.Tensor]], *, version: int) -> None:
        """Bring the base weights to ``W_0 + ΔW_1 + ... + ΔW_version`` for the run ``lineage``.

        ``deltas`` holds only the updates this model lacks, in round order: with the base already
        at version ``v`` of ``lineage``, ``deltas[t]`` is ΔW of round ``v+t+1`` (so ``deltas[:version-v]``
        is applied; after a restore to ``W_0`` — another lineage, or a lower version — ``v`` is 0
        and ``deltas`` must start at round 1). Each maps module names (as in :meth:`base_layers`)
        to ΔW in peft's orientation ``(d_out, d_in)`` (``lora_B @ lora_A``); it is added as peft
        merges an adapter, transposed where the layer stores its weight ``fan_in_fan_out`` (GPT-2's ``Conv1D``).
        Each update is added in float64 and cast once, in round order, so every process that
        applies the same deltas holds bit-identical weights. A different lineage (another run in
        the same process) or a lower version restores ``W_0`` first.
        """
        lora_layers = self.lora_layers()
        self.pristine = self.pristine or self.merged_base()
        if lineage != self.base_lineage or version < self.base_version:
            with torch.no_grad():
                for name, module in lora_layers.items():
                    module.get_base_layer().weight.copy_(self.pristine[name].to(module.get_base_layer().weight.device))
            self.base_lineage, self.base_version = lineage, 0
        if len(deltas) < version - self.base_version:
            raise ValueError(
                f"base at version {self.base_version} needs {version - self.base_version} updates, got {len(deltas)}"
            )
        with torch.no_grad():
            for delta in deltas[: version - self.base_version]:
                for name, dw in delta.items():
                    if name not in lora_layers:
                        raise ValueError(f"base update for {name!r}, which is not a LoRA-adapted module of this model")
                    merge_delta(lora_layers[name], dw)
        self.base_version = version


def merge_delta(module: LoraLayer, delta_w: torch.Tensor) -> None:
    """``W ← W + ΔW`` for one LoRA-adapted module, with peft's merge semantics.

    ``delta_w: (d_out, d_in)`` as ``lora_B @ lora_A``; transposed as peft's ``get_delta_weight`` does
    when the layer keeps its weight as ``(d_in, d_out)`` (``fan_in_fan_out``). Added in float64, cast once.
    """
    weight = module.get_base_layer().weight
    dw = transpose(delta_w.to("cpu", torch.float64), bool(getattr(module, "fan_in_fan_out", False)))
    if tuple(dw.shape) != tuple(weight.shape):
        raise ValueError(
            f"base update of shape {tuple(delta_w.shape)} does not fit a weight of shape {tuple(weight.shape)}"
        )
    merged = weight.detach().to("cpu", torch.float64) + dw
    weight.copy_(merged.to(weight.dtype).to(weight.device))


def adapter_delta(module: LoraLayer, adapter_name: str) -> torch.Tensor:
    """peft's ``get_delta_weight`` of one adapter, in float64 (bit-reproducible, see ``exact_product``)."""
    product = exact_product(
        module.lora_B[adapter_name].weight.detach().cpu(), module.lora_A[adapter_name].weight.detach().cpu()
    )
    return transpose(product, bool(getattr(module, "fan_in_fan_out", False))) * module.scaling[adapter_name]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def cached_model(cfg: ModelConfig, *, num_labels: int, device: torch.device, seed: int = 0) -> CachedModel:
    """The process-wide PEFT model for this model config, built on first use.

    Built under ``torch.manual_seed(seed)`` (on a forked RNG) so a freshly initialised head is
    the same in every process of a run.
    """
    key = (
        "model",
        cfg.name_or_path,
        cfg.task,
        cfg.dtype,
        cfg.autocast,
        cfg.quantization,
        cfg.gradient_checkpointing,
        cfg.attn_implementation,
        num_labels,
        str(device),
        seed,
        cfg.peft,
        repr(sorted(cfg.peft_options.items())),
        _lora_key(cfg.lora),
    )
    with _LOCK:
        if key not in _MODELS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                base = load_base_model(cfg, num_labels=num_labels)
                rank = cfg.lora.r if has_ranks(cfg) else None
                peft_model = get_peft_model(base, peft_config(cfg, rank=rank), adapter_name=adapter_name(rank))
            if cfg.quantization == "none":  # bitsandbytes placed a quantized base itself
                peft_model.to(device)
            if cfg.autocast is not None:  # read by fedpeft.training.local.outputs, wherever the model runs
                setattr(peft_model, AUTOCAST, AUTOCAST_DTYPES[cfg.autocast])
            _MODELS[key] = CachedModel(model=peft_model, cfg=cfg, device=device)
        return _MODELS[key]


def _lora_key(lora: LoraSettings) -> tuple:
    return (lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules), tuple(lora.modules_to_save))


def clear_cache() -> None:
    with _LOCK:
        _MODELS.clear()
        _TOKENIZERS.clear()
