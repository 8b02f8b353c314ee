"""Data: the embedded corpus, the held-out split, partitions, local sources and clear errors."""

from __future__ import annotations

import json

import pytest

from fedpeft.config.schema import DataConfig
from fedpeft.data.encoding import encode, label_counts, make_loader
from fedpeft.data.partition import build, node_data, prepare
from fedpeft.data.sources import DataError


def test_embedded_bbc_has_five_sorted_topics_and_a_stratified_test_split():
    data = prepare(DataConfig(), seed=0, num_clients=10)
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    total = len(data.train) + len(data.test)
    assert 2100 < total <= 2225  # exact duplicate articles are dropped
    assert len(set(data.train["text"]) | set(data.test["text"])) == total
    assert abs(len(data.test) / total - 0.2) < 0.01
    per_label = label_counts(data.test["label"], 5)
    totals = [a + b for a, b in zip(per_label, label_counts(data.train["label"], 5))]
    for n_test, n_all in zip(per_label, totals):
        assert abs(n_test - 0.2 * n_all) <= 1  # stratified


def test_split_and_partitions_are_a_function_of_the_seed():
    a = build(DataConfig(max_samples=300), seed=3, num_clients=4)
    b = build(DataConfig(max_samples=300), seed=3, num_clients=4)
    c = build(DataConfig(max_samples=300), seed=4, num_clients=4)
    assert a.test["text"] == b.test["text"] and a.test["text"] != c.test["text"]
    assert [p["text"] for p in a.partitions] == [p["text"] for p in b.partitions]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_training_pool_disjointly(partitioner):
    data = build(DataConfig(max_samples=400, partitioner=partitioner), seed=0, num_clients=5)
    texts = [t for p in data.partitions for t in p["text"]]
    assert sorted(texts) == sorted(data.train["text"])
    assert not set(data.test["text"]) & set(texts)


def test_pathological_gives_each_client_few_classes():
    data = build(DataConfig(partitioner="pathological", classes_per_client=2), seed=0, num_clients=10)
    for part in data.partitions:
        assert sum(1 for n in label_counts(part["label"], 5) if n) <= 2


def test_dirichlet_is_non_iid():
    data = build(DataConfig(dirichlet_alpha=0.1), seed=0, num_clients=10)
    shares = [max(label_counts(p["label"], 5)) / len(p) for p in data.partitions]
    assert max(shares) > 0.6


def test_client_validation_slice_is_disjoint_and_seeded():
    data = build(DataConfig(max_samples=300, val_fraction=0.2), seed=0, num_clients=3)
    train, val = data.client_split(1)
    assert len(val) == round(0.2 * len(data.partitions[1]))
    assert not set(train["text"]) & set(val["text"])
    assert data.client_split(1)[1]["text"] == val["text"]


def test_local_json_csv_and_folder(tmp_path):
    rows = [
        {"body": f"doc {i} about {'cats' if i % 2 else 'dogs'}", "topic": "cats" if i % 2 else "dogs"}
        for i in range(40)
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("body,topic\n" + "\n".join(f"{r['body']},{r['topic']}" for r in rows))
    folder = tmp_path / "docs"
    for r_i, r in enumerate(rows):
        (folder / r["topic"]).mkdir(parents=True, exist_ok=True)
        (folder / r["topic"] / f"{r_i}.txt").write_text(r["body"])
    for source in (jsonl, csv):
        data = build(
            DataConfig(name=str(source), text_column="body", label_column="topic", partitioner="iid"),
            seed=0,
            num_clients=2,
        )
        assert data.label_names == ["cats", "dogs"] and len(data.train) + len(data.test) == 40
    data = build(DataConfig(name=str(folder), partitioner="iid"), seed=0, num_clients=2)
    assert data.label_names == ["cats", "dogs"]


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (DataConfig(name="/no/such/folder"), "does not exist"),
        (DataConfig(name="./missing.csv"), "does not exist"),
        (DataConfig(label_column="topic", name="__JSON__"), "has no column 'topic'"),
        (DataConfig(partitioner="zipf"), "data.partitioner must be one of"),
        (DataConfig(test_fraction=1.5), "test_fraction"),
        (DataConfig(name="embedded:imdb"), "unknown embedded dataset"),
    ],
)
def test_bad_data_config_fails_clearly(tmp_path, cfg, fragment):
    if cfg.name == "__JSON__":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": 1}] * 10))
        cfg.name = str(path)
    with pytest.raises(DataError, match=fragment):
        build(cfg, seed=0, num_clients=2)


def test_encode_and_collate_pad_to_the_longest():
    from transformers import BertTokenizerFast

    from fedpeft.models.paths import resolve_model_path

    tok = BertTokenizerFast.from_pretrained(resolve_model_path("embedded:minilm"))
    data = build(DataConfig(max_samples=50, partitioner="iid"), seed=0, num_clients=2)
    examples = encode(data.test, tok, max_length=16, task="seq_cls")
    batch = next(iter(make_loader(examples, pad_token_id=tok.pad_token_id, batch_size=4, shuffle=False)))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].tolist() == list(data.test["label"][:4])
    lm = encode(data.test, tok, max_length=16, task="causal_lm")
    batch = next(iter(make_loader(lm, pad_token_id=tok.pad_token_id, batch_size=4, shuffle=False)))
    assert batch["labels"].shape == batch["input_ids"].shape


def test_node_data_maps_labels_onto_the_runs_and_rejects_unknown_ones(tmp_path):
    for label, texts in {"sport": ["a goal", "a match", "a race"], "tech": ["a chip", "a phone"]}.items():
        for i, text in enumerate(texts):
            (tmp_path / label).mkdir(exist_ok=True)
            (tmp_path / label / f"{i}.txt").write_text(text)
    names = ["business", "entertainment", "politics", "sport", "tech"]
    train, val = node_data(DataConfig(val_fraction=0.2), str(tmp_path), label_names=names, seed=0, node=1)
    assert len(train) + len(val) == 5 and len(val) == 1
    pooled = {t: names[label] for ds in (train, val) for t, label in zip(ds["text"], ds["label"])}
    assert pooled["a chip"] == "tech" and pooled["a race"] == "sport"  # the run's ids, not the folder's
    with pytest.raises(DataError, match=r"labels the run does not know: \['sport'\]"):
        node_data(DataConfig(), str(tmp_path), label_names=["business", "tech"], seed=0, node=1)
    with pytest.raises(DataError, match="node data-path '/no/where' does not exist"):
        node_data(DataConfig(), "/no/where", label_names=names, seed=0, node=1)
