"""Benchmark: the time of one DP-SGD step over one plain step, for the two per-sample paths.

Models: the embedded MiniLM classifier (LoRA r=8 on query/value + head) and a tiny Llama causal
LM (hidden 256, 4 layers, LoRA r=8 on q/v), batch 8, sequence 128. Each step is forward,
backward, (per-sample clipping and noise), AdamW; the median of ``--steps`` timed steps after
warm-up. Writes ``<out>.json`` and ``<out>.md``.

    python experiments/bench_dp_step.py [--steps 20] [--threads 2] [--out experiments/results/bench_dp_step]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from fedpeft.clients.dp import train_local_dp
from fedpeft.data.encoding import Collator
from fedpeft.training.local import train_local

REPO = Path(__file__).resolve().parents[1]

BATCH, SEQ = 8, 128


def minilm():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from fedpeft.models.paths import resolve_model_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("embedded:minilm"), num_labels=5)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type=TaskType.SEQ_CLS,
    )
    return get_peft_model(model, lora), "seq_cls", 30000


def tiny_llama():
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
    return get_peft_model(LlamaForCausalLM(cfg), lora), "causal_lm", 1000


def examples(n: int, *, task: str, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (SEQ,), generator=g).tolist()
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * SEQ,
                "labels": int(torch.randint(0, 5, (1,), generator=g)) if task == "seq_cls" else list(ids),
            }
        )
    return out


def time_steps(step, n: int) -> float:
    step()  # warm-up
    step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, build, steps: int) -> dict:
    model, task, vocab = build()
    model.train()
    data = examples(BATCH, task=task, vocab=vocab)
    batch = Collator(0)(data)
    plan = [list(range(BATCH))]  # the same full batch every step, so every path does the same work
    plain = time_steps(lambda: train_local(model, [batch], num_steps=1, lr=1e-4), steps)
    out = {"model": name, "batch": BATCH, "seq": SEQ, "plain_s": plain}
    for mode in ("opacus", "lora"):
        step = functools.partial(
            train_local_dp,
            model,
            data,
            Collator(0),
            num_steps=1,
            batch_size=BATCH,
            lr=1e-4,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            seed=0,
            mode=mode,
            batches=plan,
        )
        out[f"{mode}_s"] = time_steps(step, steps)
        out[f"{mode}_ratio"] = out[f"{mode}_s"] / plain
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_dp_step"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        bench("MiniLM-L6 (22.7 M) seq-cls", minilm, args.steps),
        bench("tiny Llama (4 x 256) causal LM", tiny_llama, args.steps),
    ]
    lines = [
        f"DP step / plain step, batch {BATCH}, sequence {SEQ}, CPU, {args.threads} threads, median of {args.steps} steps.",
        "",
        "| model | plain step (s) | Opacus hooks (s) | ratio | fedpeft lora path (s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['plain_s']:.3f} | {r['opacus_s']:.3f} | {r['opacus_ratio']:.2f}× | {r['lora_s']:.3f} | {r['lora_ratio']:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
