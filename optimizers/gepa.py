"""GEPA (`dspy.GEPA`) on the same per-user data, with an explicit small budget, for comparison."""

from __future__ import annotations

import dspy

from ..data.tasks import TaskSpec


def feedback_metric(task: TaskSpec):
    """GEPA's metric: the task score, and feedback naming the user's real answer."""

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = task.score(pred.answer, gold.answer)
        feedback = ("The answer matches what the user really did." if score >= 1 else
                    f"The user's real answer was {gold.answer!r}; the program answered {pred.answer!r}.")
        return dspy.Prediction(score=score, feedback=feedback)

    return metric


def gepa_optimizer(task: TaskSpec, reflection_lm: dspy.LM, max_metric_calls: int = 15, seed: int = 0) -> dspy.GEPA:
    return dspy.GEPA(
        metric=feedback_metric(task),
        reflection_lm=reflection_lm,
        max_metric_calls=max_metric_calls,
        reflection_minibatch_size=3,
        track_stats=False,
        seed=seed,
    )
