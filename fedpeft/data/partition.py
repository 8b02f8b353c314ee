"""The held-out test split and the federated partitions of a run's data.

The pipeline is the same for every source:

1. read the examples (:mod:`fedpeft.data.sources`: text with an integer ``label``;
   :mod:`fedpeft.data.instruct`: instruction rows whose ``label`` is the partition column);
2. cut a stratified, seeded test split once (the server evaluates on it every round);
3. partition the rest across ``num_clients`` with a flwr-datasets partitioner (IID, Dirichlet(α)
   over labels, pathological, natural) applied to that local dataset;
4. give each client a seeded validation slice of its own partition.

Everything is a pure function of (data config, seed, num_clients), so the server, every Ray worker
and a deployed node that serves a demo partition all see the same split; :func:`prepare` caches it
per process.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.config.schema import DataConfig, to_container
from fedpeft.data import instruct
from fedpeft.data.sources import LABEL, TEXT, DataError, drop_duplicates, hf_datasets, normalise, read_raw

if TYPE_CHECKING:
    from datasets import Dataset

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural")
DATA_FORMATS = ("text", *instruct.FORMATS)  # all but 'text' are instruction sets (fedpeft/data/instruct.py)


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


def stratified_indices(labels: Sequence[int], fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """(kept, taken): ``fraction`` of every label's examples taken at random, the rest kept."""
    rng = np.random.default_rng(seed)
    label_array = np.asarray(labels)
    kept, taken = [], []
    for label in np.unique(label_array):
        idx = np.flatnonzero(label_array == label)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        taken.extend(idx[:n].tolist())
        kept.extend(idx[n:].tolist())
    return sorted(kept), sorted(taken)


def make_partitioner(cfg: DataConfig, *, num_clients: int, seed: int):
    # flwr-datasets imports the datasets package (see fedpeft.data.sources.hf_datasets): only when partitioning
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=LABEL,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=seed,
        )
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_clients, partition_by=LABEL, num_classes_per_partition=cfg.classes_per_client, seed=seed
        )
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
    """Read, split and partition (uncached; see :func:`prepare`).

    Text is read by :mod:`fedpeft.data.sources`, an instruction set (``data.format`` alpaca, dolly,
    chat) by :mod:`fedpeft.data.instruct`; both are split and partitioned the same way.
    """
    check_data_config(cfg, num_clients=num_clients)
    if cfg.format == "text":
        ds, names = normalise(read_raw(cfg), cfg, need_labels=need_labels)
        return split_and_partition(drop_duplicates(ds), names, cfg, seed=seed, num_clients=num_clients)
    ds, names = instruct.normalise(instruct.read_source(cfg), cfg)
    if cfg.partitioner in ("dirichlet", "pathological", "natural") and len(names) < 2:
        raise DataError(
            f"data.partitioner={cfg.partitioner!r} splits by a column: set data.partition_column (Dolly: category), or use data.partitioner=iid"
        )
    return split_and_partition(instruct.drop_duplicates(ds), names, cfg, seed=seed, num_clients=num_clients)


def split_and_partition(
    ds: Dataset, names: list[str], cfg: DataConfig, *, seed: int, num_clients: int
) -> FederatedData:
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
        raise DataError(
            f"cannot partition {len(train)} examples into {num_clients} clients with {cfg.partitioner!r}: {err}"
        ) from err
    empty = [k for k, p in enumerate(partitions) if len(p) == 0]
    if empty:
        raise DataError(
            f"partitioner {cfg.partitioner!r} left clients {empty} without examples; use fewer clients or another partitioner"
        )
    return FederatedData(
        label_names=names, train=train, test=test, partitions=partitions, val_fraction=cfg.val_fraction, seed=seed
    )


def node_data(
    cfg: DataConfig, path: str, *, label_names: Sequence[str], seed: int, node: int, need_labels: bool = True
) -> tuple[Dataset, Dataset]:
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
            raise DataError(
                f"node data {path!r} has labels the run does not know: {unknown[:5]} (the run's labels: {list(label_names)})"
            )
        ids = [index[names[i]] for i in ds[LABEL]]
        hf = hf_datasets()
        ds = hf.Dataset.from_dict({TEXT: ds[TEXT], LABEL: ids}).cast_column(
            LABEL, hf.ClassLabel(names=list(label_names))
        )
    return hold_out(drop_duplicates(ds), cfg.val_fraction, seed=seed, client=node)


_CACHE: dict[str, FederatedData] = {}
_LOCK = threading.Lock()


def prepare(cfg: DataConfig, *, seed: int, num_clients: int, need_labels: bool = True) -> FederatedData:
    """:func:`build`, cached per process (a Ray worker reads and partitions the corpus once)."""
    key = json.dumps([to_container(cfg), seed, num_clients, need_labels], sort_keys=True)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build(cfg, seed=seed, num_clients=num_clients, need_labels=need_labels)
        return _CACHE[key]
