"""Typed configuration schema.

Every YAML file under ``conf/`` is validated against these dataclasses when Hydra composes the
config, so a typo (``strategy.lamda``) or a wrong type (``num_rounds: ten``) fails at start with a
message naming the key, not twenty minutes into a run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import InterpolationResolutionError

EMBEDDED_MODEL = "embedded:minilm"
EMBEDDED_DATA = "embedded:bbc"


class ConfigError(ValueError):
    """A config value is missing or outside what a run can use; the message names the key."""


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank (the default for every client)."})
    alpha: float = field(
        default=16.0,
        metadata={
            "help": "lora_alpha at rank `r`. With heterogeneous ranks every client keeps the scaling "
            "alpha / r (so a rank-r_k client uses alpha_k = alpha * r_k / r), which keeps zero-padded "
            "factors of different ranks on one scale."
        },
    )
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={
            "help": "Modules LoRA adapts, by name or name suffix (peft's rule); each must match a module of the model."
        },
    )
    modules_to_save: list[str] = field(
        default_factory=lambda: ["classifier"],
        metadata={"help": "Fully trained (and federated) modules, e.g. a classification head."},
    )


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "'embedded:minilm', a Hugging Face model id, or a local directory."},
    )
    task: str = field(default="seq_cls", metadata={"help": "'seq_cls' or 'causal_lm'."})
    max_length: int = field(
        default=64, metadata={"help": "Tokens per example (truncated); at most the model's positions."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the base is loaded and run in: float32, bfloat16 or float16. LoRA factors stay float32 (peft upcasts them)."
        },
    )
    quantization: str = field(
        default="none",
        metadata={
            "help": "'none', '4bit' (QLoRA: NF4 base) or '8bit' (bitsandbytes, CUDA only). The adapter, aggregation and saved artifact stay float32."
        },
    )
    autocast: str | None = field(
        default=None,
        metadata={
            "help": "Mixed precision: the forward runs under torch.autocast in this dtype ('bfloat16'), so the base's matmuls are "
            "bf16 (~2x faster on a CPU with AVX512-BF16 or AMX, and on GPUs) while weights, gradients, optimizer state, the adapter "
            "on the wire and aggregation stay in `dtype`. None: off."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward (less memory, ~30% slower)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "transformers' attn_implementation: 'eager', 'sdpa', 'flash_attention_2'; None: transformers' default."
        },
    )
    peft: str = field(
        default="lora",
        metadata={
            "help": "The peft method, built from peft's own config class: 'lora', 'dora' (LoraConfig(use_dora=True)), "
            "'ia3' (IA3Config on lora.target_modules) or 'prompt_tuning' (PromptTuningConfig). Only LoRA has ranks."
        },
    )
    peft_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Extra keyword arguments for the peft config class, e.g. {num_virtual_tokens: 16} for prompt_tuning."
        },
    )
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    name: str = field(
        default=EMBEDDED_DATA,
        metadata={
            "help": "'embedded:bbc', a Hugging Face dataset name, a local JSON/JSONL/CSV file, or a "
            "folder of <label>/<doc>.txt files."
        },
    )
    text_column: str = "text"
    label_column: str = "label"
    split: str = field(default="train", metadata={"help": "Split to read from a HF dataset."})
    subset: str | None = field(
        default=None, metadata={"help": "Configuration of a HF dataset (e.g. 'main' for openai/gsm8k)."}
    )
    test_fraction: float = 0.2
    max_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many examples (stratified); for quick runs."}
    )
    partitioner: str = field(default="dirichlet", metadata={"help": "'iid', 'dirichlet' or 'pathological'."})
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    val_fraction: float = 0.1
    # Instruction tuning (fedpeft/data/instruct.py): the columns of each format, the prompt and the loss.
    format: str = field(
        default="text",
        metadata={
            "help": "'text' (a text column: classification or plain LM), 'alpaca', 'dolly' or 'chat' (instruction tuning of a causal LM)."
        },
    )
    instruction_column: str | None = field(default=None, metadata={"help": "Default: 'instruction' (alpaca, dolly)."})
    input_column: str | None = field(
        default=None, metadata={"help": "Optional context column. Default: 'input' (alpaca), 'context' (dolly)."}
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Default: 'output' (alpaca), 'response' (dolly)."}
    )
    messages_column: str | None = field(
        default=None, metadata={"help": "Default: 'messages' (chat): a list of {role, content}."}
    )
    partition_column: str | None = field(
        default=None,
        metadata={
            "help": "Column the non-IID partitioners split by (Dolly: 'category'); 'natural' gives each value its own client."
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "A system message put before every prompt."})
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Loss on the prompt tokens too (default: on the response only)."}
    )


@dataclass
class MultipleChoiceEval:
    """Multiple-choice accuracy by the log-likelihood of each choice (MMLU layout)."""

    name: str | None = field(
        default=None,
        metadata={
            "help": "A JSON/JSONL/CSV file or HF dataset name in MMLU layout; 'test-split': the run's own held-out split (labelled data)."
        },
    )
    split: str = "test"
    subset: str | None = field(default=None, metadata={"help": "HF dataset configuration, e.g. 'all' for cais/mmlu."})
    question_column: str = "question"
    choices_column: str = "choices"
    answer_column: str = field(
        default="answer", metadata={"help": "Index of the right choice (or its letter A, B, ...)."}
    )
    subject_column: str | None = field(
        default="subject", metadata={"help": "Per-subject accuracy when the column exists."}
    )
    choice_format: str = field(
        default="text",
        metadata={
            "help": "'text': score each choice's text; 'letter': list the choices as A. B. ... and score the letter."
        },
    )
    max_samples: int | None = None


@dataclass
class GenerationEval:
    """Greedy generation and exact match of the final answer (GSM8K layout: the number after '####')."""

    name: str | None = field(
        default=None, metadata={"help": "A JSON/JSONL/CSV file or HF dataset name in GSM8K layout."}
    )
    split: str = "test"
    subset: str | None = field(
        default=None, metadata={"help": "HF dataset configuration, e.g. 'main' for openai/gsm8k."}
    )
    question_column: str = "question"
    answer_column: str = "answer"
    max_new_tokens: int = 256
    batch_size: int = 16
    max_samples: int | None = None


@dataclass
class EvaluationConfig:
    """What the server reports for a causal LM, every ``eval_every`` rounds and at the end."""

    response_loss: bool = field(
        default=True, metadata={"help": "Response-only loss and perplexity on the held-out split."}
    )
    mc: MultipleChoiceEval = field(default_factory=MultipleChoiceEval)
    generation: GenerationEval = field(default_factory=GenerationEval)


@dataclass
class StrategyConfig:
    """What every rule's config holds: its name and the per-client ranks.

    A rule's own options live in a subclass in its own file (``strategies/<name>.py``), stored in
    the ConfigStore as ``strategy/<name>_schema``, so an option of another rule fails at composition.
    """

    name: str = field(default="fedavg", metadata={"help": "The rule: a key of strategies.STRATEGIES."})
    ranks: list[int] | None = field(
        default=None,
        metadata={"help": "Per-client LoRA ranks (length num_clients); None: every client uses model.lora.r."},
    )
    tiers: dict[str, int] | None = field(
        default=None, metadata={"help": "Resource tiers and their ranks, e.g. {gpu: 16, laptop: 4, phone: 1}."}
    )
    client_tiers: list[str] | None = field(
        default=None, metadata={"help": "The tier of each client (length num_clients); used when ranks is None."}
    )


@dataclass
class DPConfig:
    enabled: bool | None = field(
        default=None,
        metadata={
            "help": "DP-SGD on (client=dp sets true). Left unset, any other client.dp setting is an error, "
            "so a privacy setting is never silently ignored; false turns DP off on purpose."
        },
    )
    noise_multiplier: float | None = field(
        default=None, metadata={"help": "Gaussian noise / clipping norm; or give target_epsilon instead."}
    )
    target_epsilon: float | None = field(
        default=None, metadata={"help": "ε every client may spend over the whole run; the noise is calibrated to it."}
    )
    delta: float = 1e-5
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-sample gradient clipping norm C."})
    accountant: str = field(default="rdp", metadata={"help": "Opacus accountant: 'rdp', 'prv' or 'gdp'."})
    grad_sample_mode: str = field(
        default="lora",
        metadata={
            "help": "'lora' (fedpeft's per-sample gradients of LoRA/linear layers), 'opacus' (Opacus hooks, the reference) "
            "or 'loop' (one backward per example: any peft method)."
        },
    )


@dataclass
class ClientConfig:
    local_epochs: int = field(
        default=1, metadata={"help": "Passes over the local data per round, when local_steps is 0."}
    )
    local_steps: int = field(default=10, metadata={"help": "If > 0, train exactly this many steps instead of epochs."})
    batch_size: int = field(
        default=16, metadata={"help": "Local training batch size (the expected batch under DP's Poisson sampling)."}
    )
    lr: float = field(
        default=5e-3, metadata={"help": "AdamW learning rate of the local training (a fresh optimiser every round)."}
    )
    lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "The rate of round t is lr · lr_decay^(t-1) (1: constant). FedAvg on non-IID data needs a decaying rate to converge (Li et al., ICLR 2020)."
        },
    )
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    num_cpus: float = field(
        default=1.0, metadata={"help": "CPU cores Ray reserves per simulated client (at most the machine's)."}
    )
    num_gpus: float = field(default=0.0, metadata={"help": "Fraction of a GPU per client; 0.25 puts four on one GPU."})
    dp: DPConfig = field(default_factory=DPConfig)


@dataclass
class FaultConfig:
    """Fault injection, to test and demonstrate what a run does when clients fail."""

    raise_prob: float = field(default=0.0, metadata={"help": "Probability that a client raises during a round."})
    hang_prob: float = field(default=0.0, metadata={"help": "Probability that a client hangs (sleeps) during a round."})
    hang_seconds: float = 3600.0
    crash_prob: float = field(
        default=0.0, metadata={"help": "Probability that a client's worker process dies (os._exit)."}
    )


@dataclass
class DeployConfig:
    """Where ``mode=deploy`` submits the run: a SuperLink's Control API (see docs/deployment.md)."""

    superlink: str = field(
        default="127.0.0.1:8000",
        metadata={"help": "host:port of the SuperLink (its --host/--port; one port serves nodes and runs)."},
    )
    root_certificates: str | None = field(
        default=None, metadata={"help": "CA certificate (PEM) that signed the SuperLink's TLS certificate."}
    )
    insecure: bool = field(default=False, metadata={"help": "Plain HTTP, no TLS: only for a trusted local network."})
    run_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the ServerApp writes results, on the SuperLink's machine; default: the Hydra run directory."
        },
    )
    timeout: float = field(default=86400.0, metadata={"help": "Seconds to wait for the deployed run to finish."})


@dataclass
class CompressionConfig:
    """Uplink compression of client updates (``fedpeft/compression/compeft.py``)."""

    name: str = field(
        default="none",
        metadata={"help": "'none' or 'compeft' (ComPEFT, arXiv 2311.13171: top-k of the update, ternarised)."},
    )
    density: float = field(
        default=0.1, metadata={"help": "Fraction of each tensor's update entries that travel (largest |Δ|)."}
    )
    alpha: float = field(
        default=1.0, metadata={"help": "ComPEFT's α: the kept entries become sign(Δ) · α · std(Δ) (scale=std)."}
    )
    scale: str = field(
        default="std",
        metadata={
            "help": "'std' (α · std(Δ), ComPEFT), 'mean' (the kept entries' mean |Δ|) or 'exact' (kept values as floats: sparsification only)."
        },
    )
    error_feedback: bool = field(
        default=False,
        metadata={"help": "Keep what compression dropped on the node and add it to the next round's update."},
    )


@dataclass
class AuditConfig:
    """The privacy audit of the final model (``fedpeft/audit.py``; ``python -m fedpeft.audit <run dir>``)."""

    enabled: bool = field(default=False, metadata={"help": "Run the audit at the end of the run (writes audit.json)."})
    max_examples: int | None = field(
        default=None, metadata={"help": "Score at most this many examples per client and held out (seeded choice)."}
    )
    batch_size: int = 64
    canaries: int = field(
        default=0, metadata={"help": "Random secrets planted in one client's data (causal LMs only); 0: none."}
    )
    canary_repeats: int = field(default=10, metadata={"help": "How many times each canary is planted."})
    canary_client: int = field(default=0, metadata={"help": "The partition whose training data holds the canaries."})
    canary_digits: int = field(default=6, metadata={"help": "Digits of each secret (the space is 10^digits)."})
    candidates: int = field(
        default=1000,
        metadata={"help": "M: random secrets each canary is ranked against (exposure is at most log2(M+1) bits)."},
    )


@dataclass
class EngineConfig:
    """How a simulation trains its clients (see docs/engines.md)."""

    name: str = field(
        default="ray",
        metadata={
            "help": "'ray': Flower's Ray engine, one worker process (and one base model copy) per concurrent client; "
            "'batched': the server process trains up to clients_per_pass clients in one pass over one base copy."
        },
    )
    clients_per_pass: int = field(
        default=8,
        metadata={"help": "engine=batched: clients trained together in one pass (more run in successive passes)."},
    )


ENGINES = ("ray", "batched")


@dataclass
class RayConfig:
    """The Ray cluster a simulation runs on (``engine=ray``)."""

    address: str | None = field(
        default=None,
        metadata={
            "help": "host:port of a running Ray cluster (started with `ray start --head`) to run the clients on; "
            "None: the RAY_ADDRESS environment variable if set, else a private cluster started for this run."
        },
    )


@dataclass
class Config:
    seed: int = field(
        default=0, metadata={"help": "Seeds the data split, the partitions, client sampling and every initialisation."}
    )
    num_rounds: int = field(default=10, metadata={"help": "Federated rounds (server aggregations)."})
    num_clients: int = field(
        default=10, metadata={"help": "Clients (SuperNodes); the data is partitioned into this many shares."}
    )
    clients_per_round: int = field(default=4, metadata={"help": "Clients sampled (seeded) to train in each round."})
    mode: str = field(
        default="simulation",
        metadata={
            "help": "'simulation' (Flower on Ray), 'deploy' (a SuperLink and its SuperNodes), 'centralized' (pooled data) or 'local' (each client alone: the local-only bound)."
        },
    )
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda'."})
    eval_every: int = field(
        default=1, metadata={"help": "Evaluate the global model every k rounds (and after the last)."}
    )
    min_clients: int = field(
        default=1, metadata={"help": "A round with fewer accepted replies leaves the global model unchanged."}
    )
    round_timeout: float = field(default=3600.0, metadata={"help": "Seconds to wait for the replies of one round."})
    on_too_few: str = field(
        default="stop",
        metadata={"help": "A round with fewer than min_clients accepted replies: 'stop' the run or 'retry' it."},
    )
    max_retries: int = 2
    server_eval_batch_size: int = 64
    comm_budget_mb: float | None = field(
        default=None, metadata={"help": "Stop once cumulative up+down traffic exceeds this many MB."}
    )
    save_adapter: bool = True
    logger: str = field(
        default="none",
        metadata={"help": "'none', or 'tensorboard': also write each round's scalars to <run dir>/tensorboard."},
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Show library logs (Flower, Ray, transformers, warnings), progress bars, Ray workers' output and "
            "tracebacks on the console; without it they go to run.log only."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Run into a directory that holds another run, deleting that run's results first."},
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "A run directory to continue from its last complete round (same config; another num_rounds lengthens the run)."
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "Free-form notes copied to results."})


def required(key: str) -> Any:
    """The ``${required:<key>}`` resolver: a value the chosen config group cannot do without.

    Hydra merges a group file onto the schema's defaults, where a ``???`` would silently keep the
    schema's value (``data=local`` would train on BBC News); an interpolation is kept and fails here.
    """
    raise ConfigError(f"{key} is required by the chosen config: add {key}=<value>")


RuleSchemas = Callable[[], Mapping[str, type]]


def _no_rules() -> Mapping[str, type]:
    return {}


_rule_schemas: RuleSchemas = _no_rules


def use_rule_schemas(source: RuleSchemas) -> None:
    """Say where the rules' config dataclasses are: a function giving ``{rule name: its config class}``.

    The rule registry (:mod:`fedpeft.strategies`) calls this when it is imported, so this module never
    imports a rule: a process that loaded no rule (a client) types ``strategy`` with the common
    :class:`StrategyConfig`. The source is called at each use, so a rule added to the registry later
    (a test's toy rule) is seen.
    """
    global _rule_schemas
    _rule_schemas = source


def rule_schemas() -> Mapping[str, type]:
    """Each known rule's config dataclass, by rule name (empty where no rule registry was imported)."""
    return _rule_schemas()


def strategy_schema(name: str, *, strict: bool = True) -> type:
    """The config dataclass of rule ``name``.

    An unknown name raises listing the valid ones; with ``strict=False`` (a client reading the
    config a server already checked, maybe for a rule this process does not have) it is the
    common :class:`StrategyConfig`, and the rule's own options are dropped.
    """
    configs = rule_schemas()
    if name in configs:
        return configs[name]
    if strict and not configs:
        raise ValueError(f"strategy {name!r} cannot be typed: no rule registry is loaded (import fedpeft.strategies)")
    if strict:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(configs)}")
    return StrategyConfig


__all__ = [
    "Config",
    "ModelConfig",
    "LoraSettings",
    "DataConfig",
    "StrategyConfig",
    "ClientConfig",
    "DPConfig",
    "DeployConfig",
    "CompressionConfig",
    "AuditConfig",
    "RayConfig",
    "EngineConfig",
    "ConfigError",
    "EMBEDDED_DATA",
    "EMBEDDED_MODEL",
    "MISSING",
    "use_rule_schemas",
    "rule_schemas",
    "to_container",
    "to_json",
    "to_config",
    "from_json",
]


def to_container(cfg: Any) -> dict[str, Any]:
    """A plain dict of a composed (DictConfig) or structured (dataclass) config."""
    if isinstance(cfg, dict):
        return cfg
    node = OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


def to_json(cfg: Any) -> str:
    """The config as canonical JSON: how it travels to the ClientApps inside Flower messages."""
    return json.dumps(to_container(cfg), sort_keys=True)


def to_config(cfg: Any) -> Config:
    """A typed :class:`Config` from a composed config, dict or JSON-decoded object.

    Merging into the structured schema rejects keys it does not know, including ones forced in
    with Hydra's ``+key=value`` (which ``OmegaConf.to_object`` would silently drop), and values of
    the wrong type; the error names the key.
    """
    return _to_config(cfg, strict=True)


def _to_config(cfg: Any, *, strict: bool) -> Config:
    container: dict[str, Any]
    if OmegaConf.is_config(cfg):
        try:
            missing = sorted(OmegaConf.missing_keys(cfg))
            if missing:
                raise ConfigError(f"{missing[0]} is required by the chosen config: add {missing[0]}=<value>")
            container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        except InterpolationResolutionError as err:  # OmegaConf wraps what a resolver (``required``) raised
            prefix = f"{ConfigError.__name__} raised while resolving interpolation: "
            message = str(err).splitlines()[0]
            if message.startswith(prefix):
                raise ConfigError(message[len(prefix) :]) from None
            raise
    else:
        container = dict(cfg)
    schema = OmegaConf.structured(Config)
    strategy = dict(container.get("strategy") or {})
    config_class = strategy_schema(str(strategy.get("name", StrategyConfig.name)), strict=strict)
    schema.strategy = OmegaConf.structured(config_class)
    if config_class is StrategyConfig and not strict:
        known = {f.name for f in dataclasses.fields(StrategyConfig)}
        container = {**container, "strategy": {k: v for k, v in strategy.items() if k in known}}
    return cast(Config, OmegaConf.to_object(OmegaConf.merge(schema, container)))


_PARSED: dict[str, Config] = {}


def from_json(text: str) -> Config:
    """Validate JSON against the schema and return a typed :class:`Config` (cached per text).

    The JSON comes from a server that checked it; a process that imported no rule (a client) or
    does not know this one keeps only the common strategy fields, which is all a client reads.
    """
    if text not in _PARSED:
        _PARSED[text] = _to_config(json.loads(text), strict=False)
    return _PARSED[text]


def round_lr(client: ClientConfig, server_round: int) -> float:
    """The local learning rate of ``server_round`` (1-based): ``lr · lr_decay^(round-1)``.

    It depends on the round alone, so a resumed or lengthened run trains each round at the rate a
    run planned that long does; round 0 (evaluation only) and round 1 have the base rate.
    """
    return client.lr * client.lr_decay ** max(0, server_round - 1)


def evaluates(cfg: Config, server_round: int) -> bool:
    """Whether ``server_round`` scores the test split: every ``eval_every`` rounds and after the last."""
    return server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds
