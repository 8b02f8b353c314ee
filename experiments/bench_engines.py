"""Benchmark: the Ray engine (one base per actor, one client at a time per actor) against the batched
pass (one base, several clients' adapters per forward).

CPU (default): the default experiment (FedIT, MiniLM + BBC News, 10 clients, 4 a round, 10 local
steps of 16 examples, 64 tokens), cut to a few rounds.

* ``ray``: real Flower + Ray runs (``fedpeft.run.execute``); wall time per round (round 1, which
  loads the base on every worker, reported apart) and training tokens/s = the non-padding tokens
  the sampled clients trained on in a round / the round's wall time.
* ``pass``: the training part of one round alone, in this process on all cores, for the clients Ray
  sampled in round 1 from the same start adapter, data order and seeds: one client after the other
  through ``train_local`` (what a Ray worker runs) against all of them in one ``train_batched`` pass.
* ``batched``: whole runs with ``engine=batched``, when this branch has that engine.

GPU (``--gpu``): the workload of issue 14: a random-init Llama-shaped model (125M: 768 wide, 12
layers; ``--sizes 125m,1.1b`` adds a 1.1B TinyLlama shape), bf16, LoRA r=16 on every linear layer,
batch 4 x 512 tokens, 8 clients x 20 steps. In one process: one client at a time, 8 clients in one
batched pass, and the single-process ceiling (one adapter, batch 64); tokens/s and peak
``torch.cuda.max_memory_allocated``. With ``--gpu-ray``, also real Ray runs at ``client.num_gpus``
1.0 / 0.25 / 0.125 (tokens/s of round 2, peak device memory polled with nvidia-smi).

    python experiments/bench_engines.py [--rounds 3]                 # CPU
    python experiments/bench_engines.py --gpu [--gpu-ray] [--sizes 125m,1.1b]
    python experiments/bench_engines.py --gpu --smoke                # the GPU code path, tiny, on CPU

Writes experiments/results/bench_engines[_gpu].json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fedpeft.cli.configs import compose_config
from fedpeft.config.schema import Config
from fedpeft.data.encoding import encode, make_loader
from fedpeft.data.partition import prepare
from fedpeft.models import adapters as models
from fedpeft.training.batched import ClientTask, train_batched
from fedpeft.training.local import _cycle, num_local_steps, train_local

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "experiments" / "results"


def shuffle_seed(seed: int, server_round: int, pid: int) -> int:
    """The ClientApp's loader seed (clients/app.py ``train``)."""
    return (seed * 1_000_003 + server_round) * 1_009 + pid


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------ CPU
def cpu_config(rounds: int, extra: list[str]) -> Config:
    return compose_config([f"num_rounds={rounds}", "eval_every=10000", "save_adapter=false", "device=cpu", *extra])


def client_tokens(cfg: Config, encoded: dict[int, list], pid: int, server_round: int, pad_id: int) -> int:
    """Non-padding tokens client ``pid`` trains on in ``server_round`` (its own loader, replayed)."""
    loader = make_loader(
        encoded[pid],
        pad_token_id=pad_id,
        batch_size=cfg.client.batch_size,
        shuffle=True,
        seed=shuffle_seed(cfg.seed, server_round, pid),
    )
    steps = num_local_steps(
        num_examples=len(encoded[pid]),
        batch_size=cfg.client.batch_size,
        local_epochs=cfg.client.local_epochs,
        local_steps=cfg.client.local_steps,
    )
    return sum(int(b["attention_mask"].sum()) for b in _cycle(loader, steps))


def encoded_clients(cfg: Config) -> tuple[dict[int, list], int, int]:
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=cfg.model.task == "seq_cls")
    tok = models.load_tokenizer(cfg.model)
    enc = {
        k: encode(data.client_split(k)[0], tok, max_length=cfg.model.max_length, task=cfg.model.task)
        for k in range(cfg.num_clients)
    }
    return enc, data.num_labels, tok.pad_token_id


def run_engine(cfg: Config, encoded: dict[int, list], pad_id: int) -> dict[str, Any]:
    from fedpeft.run import execute

    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        started = time.perf_counter()
        rows = execute(cfg, Path(tmp))
        total = time.perf_counter() - started
    rounds = []
    for row in rows:
        pids = [c["partition"] for c in row["clients"]]
        tokens = sum(client_tokens(cfg, encoded, p, row["round"], pad_id) for p in pids)
        rounds.append(
            {
                "round": row["round"],
                "wall_s": row["wall_seconds"],
                "clients": pids,
                "tokens": tokens,
                "tokens_per_s": tokens / row["wall_seconds"],
            }
        )
    warm = rounds[1:] or rounds
    return {
        "run_wall_s": total,
        "rounds": rounds,
        "round1_wall_s": rounds[0]["wall_s"],
        "warm_round_wall_s": sum(r["wall_s"] for r in warm) / len(warm),
        "warm_tokens_per_s": sum(r["tokens"] for r in warm) / sum(r["wall_s"] for r in warm),
        "final_test_accuracy": rows[-1]["test_accuracy"],
    }


def training_pass(
    cfg: Config,
    encoded: dict[int, list],
    num_labels: int,
    pad_id: int,
    pids: list[int],
    *,
    server_round: int = 1,
    repeats: int = 1,
) -> dict[str, Any]:
    """Round ``server_round``'s training of ``pids``: one after the other vs one batched pass (best of ``repeats``)."""
    torch.set_num_threads(os.cpu_count() or 1)
    cm = models.cached_model(cfg.model, num_labels=num_labels, device=models.resolve_device(cfg.device), seed=cfg.seed)
    rank = cfg.model.lora.r
    model = cm.activate(rank)
    start = cm.adapter_state(rank)
    name = models.adapter_name(rank)
    steps = {
        p: num_local_steps(
            num_examples=len(encoded[p]),
            batch_size=cfg.client.batch_size,
            local_epochs=cfg.client.local_epochs,
            local_steps=cfg.client.local_steps,
        )
        for p in pids
    }
    tokens = sum(client_tokens(cfg, encoded, p, server_round, pad_id) for p in pids)

    def loader(p: int):
        return make_loader(
            encoded[p],
            pad_token_id=pad_id,
            batch_size=cfg.client.batch_size,
            shuffle=True,
            seed=shuffle_seed(cfg.seed, server_round, p),
        )

    def sequential() -> None:
        for p in pids:
            cm.load_adapter_state(rank, start)
            train_local(
                model,
                loader(p),
                num_steps=steps[p],
                lr=cfg.client.lr,
                weight_decay=cfg.client.weight_decay,
                device=cm.device,
            )

    def batched() -> None:
        tasks = [
            ClientTask(
                adapter_name=name,
                adapter=start,
                batches=loader(p),
                num_steps=steps[p],
                lr=cfg.client.lr,
                weight_decay=cfg.client.weight_decay,
            )
            for p in pids
        ]
        train_batched(model, tasks, pad_token_id=pad_id, device=cm.device)

    out: dict[str, Any] = {"clients": pids, "tokens": tokens, "threads": torch.get_num_threads()}
    for label, fn in (("one_at_a_time", sequential), ("batched_pass", batched)):
        best = min(_timed(fn) for _ in range(repeats))
        out[label] = {"wall_s": best, "tokens_per_s": tokens / best}
    cm.load_adapter_state(rank, start)
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def has_batched_engine() -> bool:
    return importlib.util.find_spec("fedpeft.engines.batched") is not None


class TreeMemoryPoller:
    """Peak resident memory of a process and all its descendants (Ray's raylet and workers are the
    driver's descendants), from /proc every 0.5 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mib = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss_mib(self) -> float:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(proc.name))
                rss[int(proc.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(children.get(pid, []))
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._tree_rss_mib())
            self._stop.wait(0.5)

    def __enter__(self) -> TreeMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def engine_in_subprocess(engine: str, args) -> dict[str, Any]:
    """One engine's runs in a fresh process (own caches), with the peak memory of its process tree."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        out = Path(tmp) / "engine.json"
        cmd = [sys.executable, __file__, "--engine-run", engine, "--rounds", str(args.rounds), "--out", str(out)]
        for o in args.override:
            cmd += ["--override", o]
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
        with TreeMemoryPoller(proc.pid) as mem:
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"engine={engine} run failed with exit code {code}")
        report = json.loads(out.read_text())
    report["peak_rss_mib"] = mem.peak_mib
    return report


def engine_run(args) -> None:
    """The child of :func:`engine_in_subprocess`: whole runs, then (batched engine) nothing else."""
    torch.set_num_threads(os.cpu_count() or 1)
    overrides = [*args.override] + (["engine=batched"] if args.engine_run == "batched" else [])
    cfg = cpu_config(args.rounds, overrides)
    encoded, _, pad_id = encoded_clients(cfg)
    args.out.write_text(json.dumps(run_engine(cfg, encoded, pad_id)))


def run_cpu(args) -> dict[str, Any]:
    cfg = cpu_config(args.rounds, args.override)
    encoded, num_labels, pad_id = encoded_clients(cfg)
    base_params = sum(p.numel() for p in models.load_base_model(cfg.model, num_labels=num_labels).parameters())
    report: dict[str, Any] = {
        "device": device_name(),
        "config": {"rounds": args.rounds, "overrides": args.override},
        "base_parameters": base_params,
    }
    print(f"device: {report['device']}", flush=True)
    for engine in args.engines.split(","):
        if engine == "batched" and not has_batched_engine():
            report[engine] = (
                "engine=batched is not on this branch yet (needs the client's decode/train/encode split); see 'pass'"
            )
            continue
        report[engine] = engine_in_subprocess(engine, args)
        e = report[engine]
        print(
            f"{engine}: warm round {e['warm_round_wall_s']:.2f} s, {e['warm_tokens_per_s']:.0f} tokens/s, peak RSS {e['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    if args.skip_pass:
        return report
    first = next(report[e] for e in ("ray", "batched") if isinstance(report.get(e), dict))
    report["pass"] = training_pass(cfg, encoded, num_labels, pad_id, first["rounds"][0]["clients"])
    p = report["pass"]
    print(
        f"pass ({len(p['clients'])} clients, {p['threads']} threads): one at a time {p['one_at_a_time']['tokens_per_s']:.0f} tokens/s, batched {p['batched_pass']['tokens_per_s']:.0f} tokens/s",
        flush=True,
    )
    return report


def cpu_markdown(r: dict[str, Any]) -> str:
    lines = [
        "# bench_engines (CPU)",
        "",
        f"Device: {r['device']}. Default experiment (FedIT, MiniLM {r['base_parameters'] / 1e6:.1f} M parameters, 10 clients, 4 a round, "
        f"10 steps x 16 examples x <= 64 tokens), {r['config']['rounds']} rounds. Tokens are non-padding training tokens.",
        "",
        "| engine | round 1 wall (s) | later rounds wall (s) | training tokens/s (later rounds) | final test accuracy | peak RSS, all processes (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("ray", "batched"):
        if name not in r:
            continue
        e = r[name]
        if isinstance(e, dict):
            lines.append(
                f"| {name} | {e['round1_wall_s']:.2f} | {e['warm_round_wall_s']:.2f} | {e['warm_tokens_per_s']:.0f} | {e['final_test_accuracy']:.4f} | {e['peak_rss_mib']:.0f} |"
            )
        else:
            lines.append(f"| {name} | - | - | {e} | - | - |")
    p = r.get("pass")
    if p is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Training only, round 1's clients {p['clients']} ({p['tokens']} tokens), in one process with {p['threads']} threads:",
        "",
        "| path | wall (s) | tokens/s |",
        "|---|---|---|",
        f"| one client at a time (`train_local`) | {p['one_at_a_time']['wall_s']:.2f} | {p['one_at_a_time']['tokens_per_s']:.0f} |",
        f"| one batched pass (`train_batched`) | {p['batched_pass']['wall_s']:.2f} | {p['batched_pass']['tokens_per_s']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ GPU
SHAPES = {
    # Llama-shaped, random init. 125M: 768 wide, 12 layers (the workload); 1.1B: TinyLlama's shape.
    "125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "smoke": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_lora(shape: str, *, dtype: torch.dtype, device: torch.device, num_adapters: int, rank: int):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)
    base = LlamaForCausalLM(config).to(dtype=dtype, device=device)
    model = None
    for i in range(num_adapters):
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type=TaskType.CAUSAL_LM
        )
        model = (
            get_peft_model(base, lora, adapter_name=f"c{i}")
            if model is None
            else (model.add_adapter(f"c{i}", lora) or model)
        )
    return model, sum(p.numel() for p in base.parameters())


def random_batches(
    *, vocab: int, batch: int, length: int, steps: int, seed: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        out.append(
            {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
        )
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def gpu_in_process(
    shape: str,
    *,
    clients: int,
    steps: int,
    batch: int,
    length: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    model, params = llama_lora(shape, dtype=dtype, device=device, num_adapters=clients, rank=rank)
    vocab = SHAPES[shape]["vocab_size"]
    data = [
        random_batches(vocab=vocab, batch=batch, length=length, steps=steps, seed=c, device=device)
        for c in range(clients)
    ]
    starts = [
        {k: v.clone() for k, v in __import__("peft").get_peft_model_state_dict(model, adapter_name=f"c{c}").items()}
        for c in range(clients)
    ]
    tokens = clients * steps * batch * length
    out: dict[str, Any] = {
        "shape": shape,
        "base_parameters": params,
        "clients": clients,
        "steps": steps,
        "batch": batch,
        "length": length,
        "rank": rank,
    }

    # warm-up (kernels, allocator), not timed
    train_batched(
        model,
        [ClientTask(adapter_name="c0", adapter=starts[0], batches=data[0][:2], num_steps=2, lr=1e-4)],
        pad_token_id=0,
        device=device,
    )

    _peak_reset()
    started = time.perf_counter()
    for c in range(clients):
        model.set_adapter(f"c{c}")
        train_local(model, data[c], num_steps=steps, lr=1e-4, device=device)
    _sync()
    wall = time.perf_counter() - started
    out["one_at_a_time"] = {"wall_s": wall, "tokens_per_s": tokens / wall, "peak_gib": _peak_gib()}

    _peak_reset()
    started = time.perf_counter()
    tasks = [
        ClientTask(adapter_name=f"c{c}", adapter=starts[c], batches=data[c], num_steps=steps, lr=1e-4)
        for c in range(clients)
    ]
    train_batched(model, tasks, pad_token_id=0, device=device)
    _sync()
    wall = time.perf_counter() - started
    out["batched_pass"] = {
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "peak_gib": _peak_gib(),
        "clients_per_pass": clients,
    }

    big = clients * batch  # the single-process ceiling: one adapter, all clients' rows in one batch
    ceiling_steps = max(2, steps // 4)
    ceiling_data = random_batches(vocab=vocab, batch=big, length=length, steps=ceiling_steps, seed=99, device=device)
    _peak_reset()
    model.set_adapter("c0")
    started = time.perf_counter()
    train_local(model, ceiling_data, num_steps=ceiling_steps, lr=1e-4, device=device)
    _sync()
    wall = time.perf_counter() - started
    out["single_process_ceiling"] = {
        "batch": big,
        "wall_s": wall,
        "tokens_per_s": ceiling_steps * big * length / wall,
        "peak_gib": _peak_gib(),
    }
    del model
    _peak_reset()
    return out


class DeviceMemoryPoller:
    """Peak device memory in use (all processes), from nvidia-smi every 0.2 s; no CUDA context here."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mib = max(self.peak_mib, int(text.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> DeviceMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_llama_dir(shape: str, root: Path) -> Path:
    """A random-init Llama of ``shape`` saved with MiniLM's WordPiece tokenizer (no hub at run time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = root / f"llama-{shape}"
    LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)).to(
        torch.bfloat16
    ).save_pretrained(path)
    cfg = compose_config([])
    models.load_tokenizer(cfg.model).save_pretrained(path)
    return path


def write_long_texts(path: Path, *, n: int, words: int) -> Path:
    import random

    rng = random.Random(0)
    vocab = [w for w in models.load_tokenizer(compose_config([]).model).get_vocab() if w.isalpha() and len(w) > 2][
        :20000
    ]
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")
    return path


def gpu_ray(
    shape: str,
    fractions: list[float],
    *,
    root: Path,
    clients: int,
    steps: int,
    batch: int,
    length: int,
    rank: int,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    from fedpeft.run import execute

    model_dir = write_llama_dir(shape, root)
    data = write_long_texts(root / "texts.jsonl", n=clients * 40, words=length)
    out = []
    for frac in fractions:
        overrides = [
            "model=hf_causal_lm",
            f"model.name_or_path={model_dir}",
            "model.dtype=bfloat16",
            f"model.max_length={length}",
            f"model.lora.r={rank}",
            f"model.lora.alpha={2 * rank}",
            "model.lora.dropout=0.0",
            f"model.lora.target_modules=[{','.join(ALL_LINEAR)}]",
            f"data.name={data}",
            "data.partitioner=iid",
            "data.test_fraction=0.05",
            "data.val_fraction=0.05",
            f"num_clients={clients}",
            f"clients_per_round={clients}",
            "num_rounds=2",
            "eval_every=10000",
            "save_adapter=false",
            f"device={device}",
            f"client.batch_size={batch}",
            f"client.local_steps={steps}",
            f"client.num_gpus={frac}",
            "client.num_cpus=1",
        ]
        if shape == "smoke":
            overrides.append("model.dtype=float32")
        cfg = compose_config(overrides)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-ray-") as tmp, DeviceMemoryPoller() as mem:
            rows = execute(cfg, Path(tmp))
        warm = rows[-1]
        tokens = clients * steps * batch * length
        out.append(
            {
                "num_gpus": frac,
                "round2_wall_s": warm["wall_seconds"],
                "tokens_per_s": tokens / warm["wall_seconds"],
                "peak_device_gib": mem.peak_mib / 1024,
            }
        )
        print(
            f"ray num_gpus={frac}: {out[-1]['tokens_per_s']:.0f} tokens/s, peak {out[-1]['peak_device_gib']:.1f} GiB",
            flush=True,
        )
    return out


def run_gpu(args) -> dict[str, Any]:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (use --smoke to run the code path on CPU)")
    dtype = torch.float32 if smoke else torch.bfloat16
    clients, steps, batch, length, rank = (3, 2, 2, 16, 4) if smoke else (8, 20, 4, 512, 16)
    report: dict[str, Any] = {"device": device_name(), "dtype": str(dtype), "smoke": smoke, "in_process": [], "ray": {}}
    for shape in ["smoke"] if smoke else args.sizes.split(","):
        r = gpu_in_process(
            shape, clients=clients, steps=steps, batch=batch, length=length, rank=rank, device=device, dtype=dtype
        )
        report["in_process"].append(r)
        print(
            f"{shape}: one at a time {r['one_at_a_time']['tokens_per_s']:.0f} tok/s, batched {r['batched_pass']['tokens_per_s']:.0f} tok/s "
            f"(peak {r['batched_pass']['peak_gib']}), ceiling {r['single_process_ceiling']['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    if args.gpu_ray:
        root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
        shape, fractions = ("smoke", [0.0]) if smoke else ("125m", [1.0, 0.25, 0.125])
        try:
            report["ray"][shape] = gpu_ray(
                shape,
                fractions,
                root=root,
                clients=clients,
                steps=steps,
                batch=batch,
                length=length,
                rank=rank,
                device=str(device),
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return report


def gpu_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# bench_engines (GPU{' smoke, on CPU' if r['smoke'] else ''})",
        "",
        f"Device: {r['device']}, {r['dtype']}.",
        "",
    ]
    lines += ["| model | path | tokens/s | peak memory (GiB) |", "|---|---|---|---|"]
    for x in r["in_process"]:
        m = f"{x['shape']} ({x['base_parameters'] / 1e6:.0f} M)"
        for label in ("one_at_a_time", "batched_pass", "single_process_ceiling"):
            peak = x[label]["peak_gib"]
            lines.append(
                f"| {m} | {label.replace('_', ' ')} | {x[label]['tokens_per_s']:.0f} | {'-' if peak is None else f'{peak:.2f}'} |"
            )
    for shape, runs in r["ray"].items():
        for run in runs:
            lines.append(
                f"| {shape} | ray, client.num_gpus={run['num_gpus']} (round 2) | {run['tokens_per_s']:.0f} | {run['peak_device_gib']:.2f} (device) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--override", action="append", default=[], help="extra config override for the CPU runs (repeatable)"
    )
    parser.add_argument("--engines", default="ray,batched", help="CPU: which engines to run, comma-separated")
    parser.add_argument("--skip-pass", action="store_true", help="CPU: skip the training-only comparison")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument(
        "--gpu-ray", action="store_true", help="with --gpu: also real Ray runs at num_gpus 1.0/0.25/0.125"
    )
    parser.add_argument("--sizes", default="125m")
    parser.add_argument("--smoke", action="store_true", help="with --gpu: a tiny model on CPU, to check the code path")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--engine-run", choices=["ray", "batched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_run:
        engine_run(args)
        return
    report = run_gpu(args) if args.gpu else run_cpu(args)
    stem = "bench_engines_gpu" + ("_smoke" if args.gpu and args.smoke else "") if args.gpu else "bench_engines"
    out = args.out or RESULTS / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    md = gpu_markdown(report) if args.gpu else cpu_markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
