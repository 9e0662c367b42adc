"""Metrics that work offline, with ``evaluate`` as the first choice for users who have the Hub.

``evaluate.load("accuracy")`` fetches the metric script from the Hub, so without it every metric fails. The
functions here need only numpy (and ``rouge-score`` when installed); ``load_metric`` tries ``evaluate`` first
unless ``HF_HUB_OFFLINE`` is set and falls back to them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np

Metric = Callable[[Sequence, Sequence], dict[str, float]]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Return the fraction of predictions equal to their reference."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape or predictions.size == 0:
        raise ValueError(f"Need as many predictions as references, got {predictions.shape} and {references.shape}")
    return float((predictions == references).mean())


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Return the unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), as ``sklearn f1_score(average="macro")``.

    The classes are those that occur in the predictions or the references.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    accuracy(predictions, references)  # same shape checks
    scores = []
    for label in np.union1d(predictions, references):
        true_positives = np.sum((predictions == label) & (references == label))
        scores.append(2 * true_positives / (np.sum(predictions == label) + np.sum(references == label)))
    return float(np.mean(scores))


def _rouge_tokens(text: str) -> list[str]:
    # The rouge-score tokenizer without stemming: lowercase, then runs of [a-z0-9] are tokens.
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_rouge_l(prediction: str, reference: str) -> float:
    """Return the ROUGE-L F1 of one prediction against one reference.

    With L the length of the longest common subsequence of the two token lists, precision is L / prediction length,
    recall L / reference length, and F1 their harmonic mean; 0 when either text has no tokens. It matches
    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure``.
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    # One row of the LCS dynamic-programming table at a time: previous[j] = LCS(ref[:i-1], pred[:j]).
    previous = [0] * (len(pred) + 1)
    for token in ref:
        current = [0]
        for j, other in enumerate(pred):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return the mean ROUGE-L F1 over pairs, computed by ``rouge-score`` if installed, else by ``lcs_rouge_l``.

    Unlike ``evaluate``'s "rouge", which reports the middle of a bootstrap, this is the plain mean.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"Need as many predictions as references, got {len(predictions)} and {len(references)}")
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        scores = [lcs_rouge_l(p, r) for p, r in zip(predictions, references)]
    else:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return float(np.mean(scores))


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "rouge_l": rouge_l,
}
# Other spellings -> (our name, ``evaluate`` metric, its compute() kwargs, the key of its result).
_EVALUATE = {
    "accuracy": ("accuracy", "accuracy", {}, "accuracy"),
    "macro_f1": ("macro_f1", "f1", {"average": "macro"}, "f1"),
    "f1": ("macro_f1", "f1", {"average": "macro"}, "f1"),
    "rouge_l": ("rouge_l", "rouge", {"rouge_types": ["rougeL"], "use_aggregator": True}, "rougeL"),
    "rougel": ("rouge_l", "rouge", {"rouge_types": ["rougeL"], "use_aggregator": True}, "rougeL"),
    "rouge": ("rouge_l", "rouge", {"rouge_types": ["rougeL"], "use_aggregator": True}, "rougeL"),
}


def _canonical(name: str) -> str:
    key = name.lower()
    if key not in _EVALUATE:
        raise ValueError(f"Unknown metric {name!r}; offline metrics: {sorted(_EVALUATE)}")
    return _EVALUATE[key][0]


def compute_metrics(names: str | Iterable[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Return ``{metric name: value}`` for each offline metric in ``names`` ("accuracy", "macro_f1", "rouge_l")."""
    names = [names] if isinstance(names, str) else list(names)
    return {_canonical(name): METRICS[_canonical(name)](predictions, references) for name in names}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_metric(name: str) -> Metric:
    """Return ``metric(predictions, references) -> {name: value}`` for ``accuracy``, ``macro_f1`` or ``rouge_l``.

    Unless ``HF_HUB_OFFLINE`` is set, the metric is ``evaluate.load`` of the matching Hub metric; if that fails for
    any reason, a one-line warning is issued and the offline implementation of this module is used.
    """
    canonical = _canonical(name)
    _, hub_name, kwargs, key = _EVALUATE[name.lower()]

    def offline(predictions: Sequence, references: Sequence) -> dict[str, float]:
        return {canonical: METRICS[canonical](predictions, references)}

    if _hub_offline():
        return offline
    try:
        import evaluate

        module = evaluate.load(hub_name)
    except Exception as error:  # no Hub, no evaluate, a broken cache: all mean "use the offline one"
        warnings.warn(
            f"evaluate.load({hub_name!r}) failed ({type(error).__name__}); using the offline {canonical}", stacklevel=2
        )
        return offline

    def hub(predictions: Sequence, references: Sequence) -> dict[str, float]:
        return {canonical: float(module.compute(predictions=predictions, references=references, **kwargs)[key])}

    return hub
