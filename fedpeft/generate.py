"""Use a finished run: ``python -m fedpeft.generate <run dir> "<prompt>"`` (or ``--file prompts.jsonl``).

Loads the run's final model with plain transformers + peft — ``final_adapter/`` on the run's base
model (``PeftModel.from_pretrained``), or ``final_model/`` (a rule that moved the base saves the
merged weights) — builds each prompt the way training did (the tokenizer's chat template, else
the plain template of :mod:`fedpeft.data.instruct`, with the run's ``data.system_prompt``) and decodes
greedily.

A prompts file has one JSON object per line: ``{"prompt": ...}``, ``{"instruction": ..., "input": ...}``
or ``{"messages": [{role, content}, ...]}`` ending with a user turn. With ``--file`` the output is
JSON lines ``{"prompt": ..., "output": ...}``; otherwise the bare output. ``--evaluate`` prints the
run's evaluation metrics recomputed from the saved model (they equal the last row of ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedpeft import strategies  # noqa: F401  (registers the rules' config classes, which type a run's strategy.*)
from fedpeft.config.schema import Config, ModelConfig, to_config
from fedpeft.data import instruct
from fedpeft.data.partition import prepare
from fedpeft.evaluation import llm as llm_eval
from fedpeft.models import llm
from fedpeft.models.paths import resolve_model_path


class GenerateError(ValueError):
    """The run directory or the prompts cannot be used; the message says why."""


def base_path(cfg: ModelConfig) -> str:
    """Where the run's base model lives (the tiny Llama is rebuilt bit for bit if its cache is gone)."""
    return resolve_model_path(cfg.name_or_path)


def load_run(run_dir: Path, *, device: str = "cpu") -> tuple[Config, Any, Any]:
    """(config, model, tokenizer) of a finished run, loaded with plain transformers + peft."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise GenerateError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = to_config(OmegaConf.load(run_dir / "config.yaml"))
    if cfg.model.task != "causal_lm":
        raise GenerateError(
            f"run {str(run_dir)!r} trained a {cfg.model.task!r} model; generation needs model.task=causal_lm"
        )
    kwargs = {"dtype": llm.DTYPES[cfg.model.dtype]}
    model: torch.nn.Module
    if (run_dir / "final_model").is_dir():
        model = AutoModelForCausalLM.from_pretrained(run_dir / "final_model", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "final_model")
    elif (run_dir / "final_adapter").is_dir():
        path = base_path(cfg.model)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, **kwargs), run_dir / "final_adapter"
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise GenerateError(
            f"run {str(run_dir)!r} has neither final_adapter/ nor final_model/ (did it finish, with save_adapter=true?)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cfg, model.to(device).eval(), tokenizer


def prompt_row(item: dict[str, Any], *, line: int) -> dict[str, str]:
    """A prompts-file object as a normalised instruction row (its response left empty)."""
    if "messages" in item:
        turns = instruct.parse_messages([*item["messages"], {"role": "assistant", "content": ""}], row=line)
        return {
            instruct.INSTRUCTION: turns[-2]["content"],
            instruct.INPUT: "",
            instruct.HISTORY: json.dumps(turns[:-2]),
        }
    text = item.get("prompt", item.get("instruction"))
    if text is None:
        raise GenerateError(
            f"prompts line {line}: expected 'prompt', 'instruction' or 'messages', got keys {sorted(item)}"
        )
    return {instruct.INSTRUCTION: str(text), instruct.INPUT: str(item.get("input") or ""), instruct.HISTORY: "[]"}


def generate_texts(
    cfg: Config,
    model,
    tokenizer,
    rows: list[dict[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[str]:
    prompts = [
        instruct.prompt_ids(
            instruct.render(row, tokenizer, system_prompt=cfg.data.system_prompt, response=""),
            tokenizer,
            budget=cfg.model.max_length,
        )[0]
        for row in rows
    ]
    return llm_eval.generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device
    )


def evaluate_run(run_dir: Path, *, device: str = "cpu") -> dict[str, Any]:
    """The run's LLM metrics (``evaluation.*``) recomputed from its saved final model on the same
    held-out split: what the last row of ``metrics.jsonl`` reports, from plain transformers + peft."""

    cfg, model, tokenizer = load_run(run_dir, device=device)
    data = prepare(cfg.data, seed=cfg.seed, num_clients=cfg.num_clients, need_labels=False)
    return llm_eval.LLMEvaluator(cfg, data, tokenizer)(model, device=device, batch_size=cfg.server_eval_batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("prompt", nargs="?", help="one prompt (an instruction)")
    parser.add_argument("--file", type=Path, help="JSON lines of prompts (see the module docstring)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="print the run's evaluation metrics, recomputed from the saved model, as JSON",
    )
    args = parser.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate_run(args.run_dir, device=args.device), sort_keys=True))
        return 0
    if (args.prompt is None) == (args.file is None):
        parser.error("give either a prompt, --file prompts.jsonl or --evaluate")
    if args.file is not None:
        lines = [line for line in args.file.read_text().splitlines() if line.strip()]
        items = [json.loads(line) for line in lines]
        rows = [prompt_row(item, line=i + 1) for i, item in enumerate(items)]
    else:
        items, rows = [{"prompt": args.prompt}], [prompt_row({"prompt": args.prompt}, line=1)]
    cfg, model, tokenizer = load_run(args.run_dir, device=args.device)
    outputs = generate_texts(
        cfg, model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device
    )
    for item, output in zip(items, outputs):
        print(json.dumps({**item, "output": output}) if args.file is not None else output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
