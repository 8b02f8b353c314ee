"""Per-node state that must outlive a process: base updates, tensors a plan keeps, the DP accountant history.

In deployment every ``flwr-clientapp`` process handles one message and exits, and a node may
restart, so this state lives on the node's disk. Each file is written to a temporary name and
renamed, so a crash mid-write leaves the previous version intact. Simulation uses the same store
(one folder per node under the run directory), so both paths run the same code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fedpeft.reporting.files import atomic_torch_save, atomic_write_bytes


class NodeStore:
    """A folder owned by one node: ``<lineage>/base-update-<round>.pt``, ``<lineage>/merged-base.safetensors``,
    ``<lineage>/kept.safetensors`` (adapter tensors a plan keeps on the node),
    ``<lineage>/compression-residual.safetensors`` (what uplink compression dropped, with error feedback),
    ``cache/`` and ``<name>.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _update_path(self, lineage: str, round_: int) -> Path:
        return self.root / lineage / f"base-update-{round_:05d}.pt"

    def save_base_update(self, lineage: str, round_: int, tensors: dict[str, torch.Tensor]) -> None:
        atomic_torch_save(self._update_path(lineage, round_), {k: v.contiguous() for k, v in tensors.items()})

    def load_base_update(self, lineage: str, round_: int) -> dict[str, torch.Tensor] | None:
        path = self._update_path(lineage, round_)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_json(self, name: str, default: Any = None) -> Any:
        path = self.root / f"{name}.json"
        if not path.exists():
            return default
        return json.loads(path.read_text())

    def save_json(self, name: str, value: Any) -> None:
        atomic_write_bytes(self.root / f"{name}.json", json.dumps(value, sort_keys=True).encode())

    # --- the merged base: W_0 + all updates so far, so a new process need not replay them
    def save_merged_base(self, lineage: str, version: int, weights: dict[str, torch.Tensor]) -> None:
        """The adapted layers' merged weights at ``version`` (safetensors: memory-mapped on load)."""

        data = save(
            {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, metadata={"version": str(version)}
        )
        atomic_write_bytes(self.root / lineage / "merged-base.safetensors", data)

    def load_merged_base(self, lineage: str) -> tuple[int, dict[str, torch.Tensor]] | None:

        path = self.root / lineage / "merged-base.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as fh:
            version = int(fh.metadata()["version"])
            return version, {k: fh.get_tensor(k) for k in fh.keys()}

    # --- adapter tensors a plan keeps on the node between rounds (``GroupPlan.keep``)
    def save_kept(self, lineage: str, tensors: dict[str, torch.Tensor]) -> None:
        """Merge ``tensors`` into what the node keeps for run ``lineage`` (a key sent again replaces the old value)."""

        kept = {**(self.load_kept(lineage) or {}), **{k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}}
        atomic_write_bytes(self.root / lineage / "kept.safetensors", save(kept))

    def load_kept(self, lineage: str) -> dict[str, torch.Tensor] | None:

        path = self.root / lineage / "kept.safetensors"
        return load_file(str(path)) if path.exists() else None

    # --- what uplink compression dropped, added back next round (``compression.error_feedback``)
    def save_residual(self, lineage: str, tensors: dict[str, torch.Tensor]) -> None:

        atomic_write_bytes(
            self.root / lineage / "compression-residual.safetensors",
            save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}),
        )

    def load_residual(self, lineage: str) -> dict[str, torch.Tensor] | None:

        path = self.root / lineage / "compression-residual.safetensors"
        return load_file(str(path)) if path.exists() else None

    # --- anything costly to rebuild in every short-lived process (encoded data)
    def load_cached(self, key: str) -> Any:
        path = self.root / "cache" / f"{key}.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save_cached(self, key: str, value: Any) -> None:
        atomic_torch_save(self.root / "cache" / f"{key}.pt", value)
