"""Answering a question whose answer is one of a closed set of labels, from label likelihoods.

`LabelPredict` is a `dspy.Predict` over the answer signature (its output field is a `Literal` of
labels). Instead of generating an answer under a grammar, it formats the prompt with the active
adapter, as `Predict` would, and scores the adapter's reply for every label: the answer comes with
the whole label distribution. A question whose options have an order (LaMP-1's two candidates)
is asked in every order the task lists and the scores averaged, so the choice cannot depend on
the order.

How the scores are obtained depends on the LM, as a `LabelScorer` strategy:
- `EngineScorer`: an engine with `score(messages, continuations)` (the embedded llama.cpp engine)
  scores every label exactly, from one evaluation of the prompt;
- `LogprobScorer`: any other LM is asked for `top_logprobs`; the label's first token is read
  where the labels diverge (labels sharing that token share its score);
- `GenerationScorer`: where the LM returns no log-probabilities, the answer is generated and the
  distribution is one-hot. The prediction says which scorer answered (`scoring`).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, get_args

import dspy
from dspy.utils.exceptions import AdapterParseError, LMError, LMUnexpectedError

from .lm import CompactJSONAdapter

Orderings = Callable[[dict[str, Any]], list[tuple[dict[str, Any], dict[str, str]]]]
FLOOR = -30.0  # log-probability of a label the LM gave no score (not among its top alternatives)


def labels_of(signature: type[dspy.Signature], field: str = "answer") -> tuple[str, ...] | None:
    """The labels of a `Literal` output field, or None for free text."""
    return get_args(signature.output_fields[field].annotation) or None


def normalized(log_scores: dict[str, float]) -> dict[str, float]:
    """Probabilities from unnormalized log-scores."""
    top = max(log_scores.values())
    weights = {label: math.exp(v - top) for label, v in log_scores.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


@dataclass
class Question:
    """One way of asking: the signature's inputs and demos, the adapter's messages for them, and
    the adapter's reply for each label."""

    signature: type[dspy.Signature]
    demos: list
    inputs: dict[str, Any]
    messages: list[dict]
    replies: dict[str, str]


class LabelScorer(Protocol):
    name: str

    def score(self, lm: dspy.LM, question: Question) -> dict[str, float]:
        """Log-scores of each label."""


class EngineScorer:
    name = "likelihood"

    def score(self, lm, question):
        messages, replies = question.messages, question.replies
        try:
            scores, tokens = lm.engine.score(messages, list(replies.values()))
        except (LMError, AdapterParseError, LookupError, NotImplementedError, TypeError):
            raise  # an LM error already, or no likelihoods (`LabelPredict` then generates)
        except Exception as exc:
            # As DSPy does for a completion: the engine's failure is the LM's (a service answers 503).
            raise LMUnexpectedError(str(exc), model=lm.model) from exc
        _record(lm, messages, tokens, self.name)
        return dict(zip(replies, scores))


class LogprobScorer:
    """Reads the label from the LM's `top_logprobs` where the adapter's replies diverge."""

    name = "logprobs"

    def __init__(self, top: int = 20):
        self.top = top

    def score(self, lm, question):
        messages, replies = question.messages, question.replies
        shared = os.path.commonprefix(list(replies.values()))
        out = lm(messages=messages, logprobs=True, top_logprobs=self.top, max_tokens=len(shared) // 2 + 16,
                 temperature=0.0)[0]
        tokens = (out.get("logprobs") or {}).get("content") if isinstance(out, dict) else None
        if not tokens:
            raise LookupError("the LM returned no log-probabilities")
        # The token where the replies diverge: its alternatives are the labels' first tokens.
        start = 0
        for token in tokens:
            if start + len(token["token"]) > len(shared):
                break
            start += len(token["token"])
        else:
            raise LookupError("the LM's reply ended before its answer")
        if "".join(t["token"] for t in tokens)[:len(shared)] != shared:
            raise LookupError("the LM's reply does not have the adapter's format")
        alternatives = [(t["token"], t["logprob"]) for t in token["top_logprobs"]]
        scores = {}
        for label, reply in replies.items():
            found = [lp for alt, lp in alternatives if alt and reply[start:].startswith(alt)]
            scores[label] = max(found, default=FLOOR)
        return scores


class GenerationScorer:
    """No log-probabilities: the generated label gets all the mass."""

    name = "generation"

    def score(self, lm, question):
        predict = dspy.Predict(question.signature)
        predict.demos = question.demos
        with dspy.context(lm=lm):
            predicted = predict(**question.inputs).answer
        return {label: 0.0 if label == predicted else FLOOR for label in question.replies}


def _record(lm: dspy.LM, messages: list[dict], tokens: int, scorer: str) -> None:
    """An entry in the LM's history, like a call's: usage meters and trackers count it."""
    if dspy.settings.disable_history:
        return
    lm.history.append({"messages": messages, "kwargs": {"scoring": scorer}, "outputs": [], "cost": None,
                       "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": max(tokens, 1)},
                       "timestamp": time.time(), "uuid": str(uuid.uuid4()), "model": lm.model, "model_type": "chat"})


def label_scorer(lm: dspy.LM) -> LabelScorer:
    return EngineScorer() if callable(getattr(lm.engine, "score", None)) else LogprobScorer()


class LabelPredict(dspy.Predict):
    """`dspy.Predict` for a closed set of labels, answered from their likelihoods.

    Returns `answer` (decided by `decide` from the distribution: the most likely label unless the
    task says otherwise), `label_scores` (label -> probability), `confidence` (the answer's
    probability) and `scoring` (which `LabelScorer` answered; `generation` means no likelihoods).
    """

    def __init__(self, signature, orderings: Orderings | None = None,
                 decide: Callable[[dict[str, float]], str] | None = None, **config):
        super().__init__(signature, **config)
        self.labels = labels_of(self.signature)
        if not self.labels:
            raise ValueError("LabelPredict needs an answer field typed as a Literal of labels")
        self.orderings = orderings
        self.decide = decide or (lambda dist: max(dist, key=dist.get))

    def forward(self, **kwargs):
        lm, _config, signature, demos, inputs = self._forward_preprocess(**kwargs)
        adapter = dspy.settings.adapter or CompactJSONAdapter()
        variants = self.orderings(inputs) if self.orderings else [(inputs, {})]
        scorer = label_scorer(lm)
        totals = dict.fromkeys(self.labels, 0.0)
        for asked, relabel in variants:
            question = Question(signature, demos, asked, adapter.format(signature, demos, asked),
                                {label: adapter.format_assistant_message_content(signature, {"answer": label})
                                 for label in self.labels})
            try:
                scores = scorer.score(lm, question)
            except (LookupError, AdapterParseError, NotImplementedError, TypeError):
                scorer = GenerationScorer()  # for this and the remaining orders
                scores = scorer.score(lm, question)
            for label, value in scores.items():
                totals[relabel.get(label, label)] += value / len(variants)
        distribution = normalized(totals)
        answer = self.decide(distribution)
        # DSPy's own ending of a call: the Prediction, recorded in DSPy's trace as any Predict's is
        # (optimizers that learn from traces, GEPA's reflection among them, see nothing without it).
        return self._forward_postprocess([{"answer": answer, "label_scores": distribution,
                                           "confidence": distribution[answer], "scoring": scorer.name}],
                                         signature, **inputs)
