"""GEPA (`dspy.GEPA`) on the same per-user data, with an explicit small budget, for comparison."""

from __future__ import annotations

from typing import Callable

import dspy

from ..data.tasks import TaskSpec
from ..program.persona import PersonaVersion
from .persona import Aligned, VersionedTeleprompter


def feedback_metric(task: TaskSpec):
    """GEPA's metric: the task score, and feedback naming the user's real answer."""

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = task.score(pred.answer, gold.answer)
        feedback = ("The answer matches what the user really did." if score >= 1 else
                    f"The user's real answer was {gold.answer!r}; the program answered {pred.answer!r}.")
        return dspy.Prediction(score=score, feedback=feedback)

    return metric


class GepaAlignment(VersionedTeleprompter):
    """`dspy.GEPA` learning from the user's latest `n_recent` interactions and validating on the
    `validation` interactions before them, the split `PersonaAlignment` uses (on the replays
    themselves only when the user has nothing earlier); it emits the versions it ran like
    `PersonaAlignment`: the starting state, then GEPA's program (its instructions, unscored here).
    It records no timings."""

    def __init__(self, reflection_lm: dspy.LM, max_metric_calls: int = 15, n_recent: int = 3, validation: int = 3,
                 seed: int = 0, on_version: Callable[[PersonaVersion], None] | None = None):
        self.reflection_lm, self.max_metric_calls, self.n_recent, self.seed = (reflection_lm, max_metric_calls,
                                                                               n_recent, seed)
        self.validation = validation
        self.on_version = on_version

    def align(self, student, *, trainset: list[dspy.Example], **_) -> Aligned:
        versions = [self._emit(student.snapshot(note="initial persona"))]
        recent = trainset[-self.n_recent:]
        earlier = trainset[:len(trainset) - len(recent)]
        window = earlier[len(earlier) - min(self.validation, len(earlier)):]
        gepa = dspy.GEPA(metric=feedback_metric(student.task), reflection_lm=self.reflection_lm,
                         max_metric_calls=self.max_metric_calls, reflection_minibatch_size=3, track_stats=False,
                         seed=self.seed)
        optimized = gepa.compile(student, trainset=recent, valset=window or recent)
        versions.append(self._emit(optimized.snapshot(note="gepa")))
        return Aligned(versions)
