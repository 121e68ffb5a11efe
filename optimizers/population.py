"""The population model: how the LM's label distribution and each tool's evidence combine into a
user's real answer, learned from every user's past interactions; and each user's adaptation of it,
shrunk toward it in proportion to how much evidence that user has.

A combination scores each label y of a question as

    s(y) = w_lm · log p_LM(y) + Σ_tool w_tool · log p_tool(y) + b_y

and answers from softmax(s) (`program.agent.combine`). `b_y` is a label's own offset (the
population's label habits), used where labels mean the same in every question (not for a choice
between candidates, whose numbers are positions). The parameters are the maximum a posteriori
estimate under a Gaussian prior centred on a starting combination:

    maximize  Σ_i log p(y_i | θ) − (strength / 2) · ‖θ − θ_prior‖²

- the population model starts from the plain LM (w_lm = 1, nothing else) and learns from all
  users' answered past interactions;
- a user's combination starts from the population model and learns from that user's own: with 3
  items the prior dominates, with 60 consistent ones the data does. `strength` is chosen on the
  population itself, by predicting each user's latest answered item from their earlier ones.

For text the user writes (a headline: `TaskSpec.styled`), there is no distribution to combine, and
what the population learns is whether a persona text computed from a user's own history (their
style: `optimizers.persona.ComputedStyle`) makes the program's answers better: every user's
validation window is answered with it and without it, and the paired wins and losses of the task's
score over the other users (`TextEffect`) decide, by a sign test with the evidence of all of them,
what one user's three items cannot.

Cross-fitting: users are split into `FOLDS` folds by a hash of their id, and each fold's model is
fitted without that fold's users. A user is always adapted from the model of their own fold, so no
answer of theirs depends on a model fitted on their interactions, whether they were in the
compile or are new. The model holds no user id and no user's text: only these parameters.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from ..program.agent import LM_WEIGHT as LM, floored_log

FOLDS = 5
# A computed text pays when a one-sided sign test over other users' paired window items gives p at
# most this (a population has the items one user lacks: 50 users give about 150 pairs).
TEXT_EFFECT_LEVEL = 0.05
STRENGTHS = (0.3, 1.0, 3.0, 10.0, 30.0)  # candidate prior strengths for a user's adaptation
POPULATION_STRENGTH = 1.0  # the population model's own pull toward the plain LM
DEFAULT_STRENGTH = 3.0  # a user's pull toward the population model when no population chose one


@dataclass
class Answered:
    """One past interaction answered by one state: what the LM and the tools said."""

    question: str
    gold: str
    answer: str
    lm_scores: dict[str, float] | None
    evidence: dict[str, dict[str, float] | None]
    candidate: bool = False  # answered under the text computed from the user's history, not the initial state


@dataclass(frozen=True)
class Combination:
    """The parameters of one combination: a weight per evidence source (`lm` and each tool's name),
    and an offset per label."""

    weights: dict[str, float] = field(default_factory=lambda: {LM: 1.0})
    bias: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextEffect:
    """Paired items of users' validation windows where the program with a computed persona text
    scored better (`wins`) or worse (`losses`) than without it."""

    wins: int = 0
    losses: int = 0

    @property
    def p_value(self) -> float:
        return sign_test(self.wins, self.losses)

    def pays(self) -> bool:
        return self.wins > self.losses and self.p_value <= TEXT_EFFECT_LEVEL

    def __add__(self, other: "TextEffect") -> "TextEffect":
        return TextEffect(self.wins + other.wins, self.losses + other.losses)


def sign_test(wins: int, losses: int) -> float:
    """One-sided p-value of `wins` or more of `wins + losses` paired differences under no effect."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


def text_effect(score, items: list[Answered]) -> TextEffect:
    """One user's paired items: each window question answered without and with the computed text
    (`score(answer, gold)` is the task's score)."""
    initial = {a.question: a for a in items if not a.candidate}
    pairs = [(score(initial[a.question].answer, a.gold), score(a.answer, a.gold))
             for a in items if a.candidate and a.question in initial]
    return TextEffect(sum(b > a for a, b in pairs), sum(b < a for a, b in pairs))


def fold_of(user_id: str, folds: int = FOLDS) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % folds


class _Design:
    """Items as matrices: per item, a (labels × parameters) feature matrix and the gold's row."""

    def __init__(self, labels: tuple[str, ...], sources: list[str], use_bias: bool, items: list[Answered]):
        self.labels, self.sources, self.use_bias = labels, sources, use_bias
        self.rows = [self._features(a) for a in items
                     if a.lm_scores is not None and a.gold in labels and not a.candidate]

    def _features(self, answered: Answered) -> tuple[np.ndarray, int]:
        columns = []
        for source in self.sources:
            distribution = answered.lm_scores if source == LM else answered.evidence.get(source)
            columns.append([floored_log(distribution.get(y, 0.0)) if distribution else 0.0 for y in self.labels])
        matrix = np.array(columns, dtype=float).T
        if self.use_bias:
            matrix = np.hstack([matrix, np.eye(len(self.labels))])
        return matrix, self.labels.index(answered.gold)

    def vector(self, combination: Combination) -> np.ndarray:
        weights = [combination.weights.get(s, 0.0) for s in self.sources]
        bias = [combination.bias.get(y, 0.0) for y in self.labels] if self.use_bias else []
        return np.array(weights + bias, dtype=float)

    def combination(self, theta: np.ndarray) -> Combination:
        weights = {s: float(w) for s, w in zip(self.sources, theta) if s == LM or abs(w) > 1e-9}
        bias = {y: float(b) for y, b in zip(self.labels, theta[len(self.sources):])} if self.use_bias else {}
        return Combination(weights, bias)

    def objective(self, theta: np.ndarray, prior: np.ndarray, strength: float) -> tuple[float, np.ndarray, np.ndarray]:
        """The penalized log-likelihood, its gradient and its Hessian."""
        value = -0.5 * strength * float((theta - prior) @ (theta - prior))
        gradient = -strength * (theta - prior)
        hessian = -strength * np.eye(len(theta))
        for matrix, gold in self.rows:
            scores = matrix @ theta
            scores -= scores.max()
            p = np.exp(scores)
            p /= p.sum()
            value += float(scores[gold] - math.log(np.exp(scores).sum()))
            mean = matrix.T @ p
            gradient += matrix[gold] - mean
            hessian -= matrix.T @ (p[:, None] * matrix) - np.outer(mean, mean)
        return value, gradient, hessian

    def fit(self, prior: Combination, strength: float) -> Combination:
        """Newton's method with backtracking; the objective is concave, so this finds its maximum."""
        start = self.vector(prior)
        theta = start.copy()
        value, gradient, hessian = self.objective(theta, start, strength)
        for _ in range(50):
            step = np.linalg.solve(hessian, -gradient)
            size = 1.0
            while size > 1e-4:
                trial = theta + size * step
                trial_value, trial_gradient, trial_hessian = self.objective(trial, start, strength)
                if trial_value >= value - 1e-12:
                    break
                size /= 2
            else:
                break
            converged = abs(trial_value - value) < 1e-9
            theta, value, gradient, hessian = trial, trial_value, trial_gradient, trial_hessian
            if converged:
                break
        return self.combination(theta)

    def log_likelihood(self, combination: Combination) -> float:
        return self.objective(self.vector(combination), self.vector(combination), 0.0)[0]


def _sources(items: list[Answered]) -> list[str]:
    return [LM, *sorted({name for a in items for name, d in a.evidence.items() if d})]


def fit(labels: tuple[str, ...], items: list[Answered], prior: Combination, strength: float,
        use_bias: bool = True, sources: list[str] | None = None) -> Combination:
    """The MAP combination of `items` under a Gaussian prior of `strength` centred on `prior`."""
    design = _Design(labels, sources or _sources(items), use_bias, items)
    return design.fit(prior, strength) if design.rows else prior


@dataclass(frozen=True)
class PopulationModel:
    """Per fold, fitted without that fold's users: a combination (closed-set tasks) and a computed
    text's effect (text tasks); and the strength with which a user's own evidence is pulled toward
    the combination."""

    folds: list[Combination]
    strength: float
    users: int
    items: int
    text_effects: list[TextEffect] = field(default_factory=list)

    def prior_for(self, user_id: str) -> Combination | None:
        """The model that answers `user_id`: fitted without any interaction of theirs."""
        return self.folds[fold_of(user_id, len(self.folds))] if self.folds else None

    def text_effect_for(self, user_id: str) -> TextEffect | None:
        """The computed text's effect on the other folds' users (none fitted: None)."""
        return self.text_effects[fold_of(user_id, len(self.text_effects))] if self.text_effects else None

    def alignment_args(self, user_id: str) -> dict:
        """What this model gives an alignment of `user_id` (`PersonaAlignment.compile`'s keywords):
        their fold's combination and text effect, and the strength of their pull toward it."""
        return {"population": self.prior_for(user_id), "text_effect": self.text_effect_for(user_id),
                "strength": self.strength}

    def to_dict(self) -> dict:
        return {"folds": [c.to_dict() for c in self.folds], "strength": self.strength, "users": self.users,
                "items": self.items, "text_effects": [asdict(e) for e in self.text_effects]}

    @classmethod
    def from_dict(cls, payload: dict) -> "PopulationModel":
        return cls([Combination(**c) for c in payload["folds"]], payload["strength"], payload["users"],
                   payload["items"], [TextEffect(**e) for e in payload.get("text_effects", [])])


def fit_text_effects(score, items_by_user: dict[str, list[Answered]], folds: int = FOLDS) -> PopulationModel:
    """Cross-fitted effects of a computed persona text, from every user's window answered with and
    without it (`score(answer, gold)`: the task's score)."""
    per_fold = [TextEffect() for _ in range(folds)]
    for user_id, items in items_by_user.items():
        per_fold[fold_of(user_id, folds)] += text_effect(score, items)
    total = sum(per_fold, TextEffect())
    effects = [TextEffect(total.wins - f.wins, total.losses - f.losses) for f in per_fold]
    return PopulationModel([], DEFAULT_STRENGTH, len(items_by_user),
                           sum(len(items) for items in items_by_user.values()), effects)


def fit_population(labels: tuple[str, ...], items_by_user: dict[str, list[Answered]], use_bias: bool = True,
                   folds: int = FOLDS) -> PopulationModel:
    """Cross-fitted population models and the adaptation strength, from every user's answered items."""
    every = [a for items in items_by_user.values() for a in items]
    sources = _sources(every)
    plain = Combination()
    by_fold: list[list[Answered]] = [[] for _ in range(folds)]
    users_by_fold: list[list[str]] = [[] for _ in range(folds)]
    for user_id, items in items_by_user.items():
        by_fold[fold_of(user_id, folds)].extend(items)
        users_by_fold[fold_of(user_id, folds)].append(user_id)
    models = [fit(labels, [a for other in range(folds) if other != fold for a in by_fold[other]], plain,
                  POPULATION_STRENGTH, use_bias, sources) for fold in range(folds)]
    strength = _choose_strength(labels, items_by_user, models, use_bias, sources, folds)
    return PopulationModel(models, strength, len(items_by_user), len(every))


def _choose_strength(labels, items_by_user, models, use_bias, sources, folds) -> float:
    """The strength under which each user's latest answered item is best predicted by their own
    adaptation from their earlier ones (each user from their fold's model, as when compiled)."""
    def held_out_likelihood(strength: float) -> float:
        total = 0.0
        for user_id, items in items_by_user.items():
            if len(items) < 2:
                continue
            prior = models[fold_of(user_id, folds)]
            adapted = fit(labels, items[:-1], prior, strength, use_bias, sources)
            total += _Design(labels, sources, use_bias, items[-1:]).log_likelihood(adapted)
        return total

    return max(STRENGTHS, key=held_out_likelihood)


def adapt(labels: tuple[str, ...], items: list[Answered], population: Combination, strength: float,
          use_bias: bool = True) -> Combination:
    """A user's combination: the population's, moved by their own answered items as far as their
    number and consistency warrant."""
    sources = sorted({*population.weights, *_sources(items)}, key=lambda s: (s != LM, s))
    return fit(labels, items, population, strength, use_bias, sources)
