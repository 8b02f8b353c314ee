"""How to continue a stopped run: the last round its checkpoint holds, and the command that resumes it."""

from __future__ import annotations

from pathlib import Path

import torch


def checkpoint_round(run_dir: Path) -> int:
    """The last round whose checkpoint is on disk (0: none)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["round"])
    except Exception:  # unreadable: it cannot be resumed from either
        return 0


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """``python -m fedpeft.run`` with the run's own overrides and ``resume=<run_dir>``."""
    kept = [o for o in overrides if not o.startswith(("resume=", "hydra.", "overwrite=", "+resume="))]
    return " ".join(["python -m fedpeft.run", *kept, f"resume={run_dir}"])


def resume_advice(run_dir: Path, overrides: list[str]) -> str:
    """How to continue a stopped run, or that there is nothing to continue."""
    done = checkpoint_round(run_dir)
    if done == 0:
        return f"no round finished, so there is nothing to resume (the config and run.log are in {run_dir})"
    return (
        f"round {done} is the last complete one (checkpointed in {run_dir}); "
        f"continue with: {resume_command(run_dir, overrides)}"
    )
