"""Shared fixtures: tiny random-init models (no download), the repo's conf/ folder, worker counters on replies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture
def tiny_bert():
    """A 2-layer random-init BERT classifier wrapped with LoRA r=4 on query/value + the head."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS
    )
    return get_peft_model(model, lora)


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running ServerApp need a run id (Flower reads it from the process)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, value)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def worker_counters(monkeypatch):
    """The simulation engine runs :data:`tests.counters.app`: replies carry the worker's counters
    (``base_loads``, ``worker_pid``, ``lora_a_crc32`` in metrics.jsonl's client rows)."""
    from tests import counters  # imports the ClientApp's whole stack: only for the tests that ask

    monkeypatch.setattr("fedpeft.engines.ray.client_app", counters.app)  # the ClientApp the Ray engine runs
