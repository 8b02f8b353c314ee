"""The final global model written so that plain transformers / peft load it, without fedpeft."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from fedpeft.models import adapters as models
from fedpeft.protocol.records import split_state
from fedpeft.server.evaluation import ServerEvaluator
from fedpeft.strategies.types import GlobalModel


def save_final(evaluator: ServerEvaluator, global_model: GlobalModel, run_dir: Path) -> Path:
    """Write the final global model so plain transformers / peft load it.

    Rules that never move the base: ``final_adapter/`` with ``save_pretrained`` (load it with
    ``PeftModel.from_pretrained(base, path)``). A moved base: ``final_model/``, the merged
    weights and head as a plain transformers checkpoint (``AutoModel....from_pretrained(path)``).
    """
    model = evaluator.load(global_model)
    name = models.adapter_name(global_model.rank)
    if not global_model.base_updates:
        target = run_dir / "final_adapter"
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            model.save_pretrained(tmp, selected_adapters=[name])
            produced = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(produced), str(target))
        return target
    target = run_dir / "final_model"
    merged = merged_checkpoint(evaluator.cm, global_model)
    merged.save_pretrained(target)
    models.load_tokenizer(evaluator.cfg.model).save_pretrained(target)
    return target


def merged_checkpoint(cm: models.CachedModel, global_model: GlobalModel) -> torch.nn.Module:
    """A plain transformers model holding base + merged updates + the global adapter and head."""
    fresh = models.load_base_model(cm.cfg, num_labels=cm.model.config.num_labels if cm.cfg.task == "seq_cls" else 0)
    prefix = "base_model.model."
    state = fresh.state_dict()
    for module, layer in cm.base_layers().items():
        state[module[len(prefix) :] + ".weight"] = layer.weight.detach().cpu().clone()
    # The global adapter merged as peft merges it (fan_in_fan_out, scaling), in float64.
    name = models.adapter_name(global_model.rank)
    for module, layer in cm.lora_layers().items():
        key = module[len(prefix) :] + ".weight"
        state[key] = (state[key].to(torch.float64) + models.adapter_delta(layer, name)).to(state[key].dtype)
    _, heads = split_state(global_model.adapter)
    for key in heads:
        state[key[len(prefix) :]] = global_model.adapter[key]
    fresh.load_state_dict(state)
    return fresh
