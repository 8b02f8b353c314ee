"""The server's checkpoint: the complete server state after a round (``checkpoint.pt``), which ``resume=``
continues from.

A resumed run ends exactly as an uninterrupted one would; its config must be the checkpoint's, or
differ in ``num_rounds`` alone (:func:`check_extension`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from fedpeft.config.schema import Config, to_json
from fedpeft.reporting.files import atomic_torch_save
from fedpeft.server.errors import RunError

CHECKPOINT = "checkpoint.pt"


def config_json(cfg: Config) -> str:
    """The run's config as a checkpoint records it and the nodes receive it: JSON, without ``resume``."""
    return to_json(dataclasses.replace(cfg, resume=None))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``checkpoint.pt`` atomically: a crash mid-write leaves the previous one intact."""
    atomic_torch_save(run_dir / CHECKPOINT, state)


def load_checkpoint(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The last complete round of ``run_dir``; its config must be the one being resumed."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise RunError(
            f"resume={str(run_dir)!r}: no {CHECKPOINT} there (the run finished no round, or this "
            "is not a run directory)"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written above
    saved, wanted = state["config"], config_json(cfg)
    if saved != wanted:
        a, b = json.loads(saved), json.loads(wanted)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff != ["num_rounds"]:
            raise RunError(f"resume={str(run_dir)!r}: the config differs from the checkpoint's in {diff}")
        check_extension(run_dir, cfg, planned=a["num_rounds"])
    return state


def check_extension(run_dir: Path, cfg: Config, *, planned: int) -> None:
    """``resume=`` with another ``num_rounds``: the run goes on (or stops) as one planned for that many rounds would.

    Nothing a round does depends on ``num_rounds`` except DP noise calibrated to reach
    ``target_epsilon`` over the planned rounds: those runs cannot be lengthened (the rounds already
    trained spent their share of a budget sized for ``planned`` rounds).
    """
    dp = cfg.client.dp
    if cfg.num_rounds > planned and dp.enabled and dp.noise_multiplier is None:
        raise RunError(
            f"resume={str(run_dir)!r} with num_rounds={cfg.num_rounds}: its DP noise was calibrated to reach "
            f"ε={dp.target_epsilon} over {planned} rounds, so more rounds would exceed that budget; start a new run "
            f"with num_rounds={cfg.num_rounds}, "
            f"or resume it with num_rounds={planned}"
        )
