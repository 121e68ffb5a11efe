"""The population model and each user's adaptation of it (`optimizers.population`), on made-up
answered items whose truth is known."""

from __future__ import annotations

import math
import random

import pytest

from personaagent.optimizers.population import (Answered, Combination, PopulationModel, TextEffect, adapt, fit,
                                                fit_population, fit_text_effects, fold_of, text_effect)

LABELS = ("a", "b", "c")


def item(gold: str, lm: dict[str, float], habit: dict[str, float] | None = None) -> Answered:
    return Answered("q", gold, "", lm, {"answer_habits": habit})


def habitual_user(n: int, label: str = "c", seed: int = 0) -> list[Answered]:
    """A user who always answers `label`, while the LM leans towards another label at random."""
    rng = random.Random(seed)
    habit = {y: (0.8 if y == label else 0.1) for y in LABELS}
    return [item(label, {y: (0.6 if y == rng.choice("ab") else 0.2) for y in LABELS}, habit) for _ in range(n)]


def lm_user(n: int, seed: int = 0) -> list[Answered]:
    """A user whose answers the LM gets right, and whose habits say nothing."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        gold = rng.choice(LABELS)
        out.append(item(gold, {y: (0.7 if y == gold else 0.15) for y in LABELS}, {y: 1 / 3 for y in LABELS}))
    return out


def test_the_population_learns_how_much_each_source_is_worth():
    model = fit(LABELS, lm_user(200), Combination(), strength=1.0, use_bias=False)
    assert model.weights["lm"] > 1.5  # the LM is right: trust it more than its raw probabilities
    habits = fit(LABELS, habitual_user(200), Combination(), strength=1.0, use_bias=False)
    assert habits.weights["answer_habits"] > 1.0 and habits.weights["lm"] < 0.5


def test_shrinkage_keeps_a_user_with_few_items_near_the_population_and_lets_one_with_many_move():
    population = fit(LABELS, lm_user(300), Combination(), strength=1.0, use_bias=False)
    few = adapt(LABELS, habitual_user(3), population, strength=10.0, use_bias=False)
    many = adapt(LABELS, habitual_user(60), population, strength=10.0, use_bias=False)
    assert abs(few.weights["lm"] - population.weights["lm"]) < 0.5 and few.weights.get("answer_habits", 0) < 1.0
    assert many.weights.get("answer_habits", 0) > 1.0 and many.weights["lm"] < population.weights["lm"] - 0.5
    # The user's habit then decides their next answer, against the LM.
    nxt = habitual_user(1, seed=99)[0]

    def score(combination: Combination, label: str) -> float:
        return (combination.weights["lm"] * math.log(nxt.lm_scores[label])
                + combination.weights.get("answer_habits", 0) * math.log(nxt.evidence["answer_habits"][label]))

    assert max(LABELS, key=lambda y: score(many, y)) == "c" and max(LABELS, key=lambda y: score(few, y)) != "c"


def test_a_cross_fitted_model_never_answers_a_user_with_a_model_fitted_on_their_interactions():
    users = {f"user{i}": (habitual_user(8, seed=i) if i % 2 else lm_user(8, seed=i)) for i in range(20)}
    model = fit_population(LABELS, users, use_bias=False)
    for user_id in users:
        fold = fold_of(user_id)
        without = {u: items for u, items in users.items() if fold_of(u) != fold}
        expected = fit(LABELS, [a for items in without.values() for a in items], Combination(), 1.0, False,
                       ["lm", "answer_habits"])
        # the same fit, from the other folds' users only
        assert model.prior_for(user_id).weights == pytest.approx(expected.weights, rel=1e-9)
        # and changing this user's items changes nothing of the model that answers them
        changed = {**users, user_id: habitual_user(8, label="a", seed=123)}
        assert fit_population(LABELS, changed, use_bias=False).prior_for(user_id) == model.prior_for(user_id)
    assert model.strength in (0.3, 1.0, 3.0, 10.0, 30.0) and model.users == 20 and model.items == 160


def window(better: int, worse: int, same: int) -> list[Answered]:
    """A user's window answered without a computed text ("plain") and with it (`candidate`)."""
    outcomes = ["better"] * better + ["worse"] * worse + ["same"] * same
    items = []
    for i, outcome in enumerate(outcomes):
        plain = {"better": "miss", "worse": "gold", "same": "gold"}[outcome]
        styled = {"better": "gold", "worse": "miss", "same": "gold"}[outcome]
        items += [Answered(f"q{i}", "gold", plain, None, {}), Answered(f"q{i}", "gold", styled, None, {}, candidate=True)]
    return items


def exact(answer: str, gold: str) -> float:
    return float(answer == gold)


def test_a_computed_text_pays_by_the_other_users_evidence_never_by_the_users_own():
    assert text_effect(exact, window(2, 0, 1)) == TextEffect(2, 0)
    users = {f"user{i}": window(2, 1, 0) for i in range(30)}  # each user: one net win, unprovable alone
    model = fit_text_effects(exact, users)
    assert all(model.text_effect_for(u).pays() for u in users) and not TextEffect(2, 1).pays()
    # A user's own items never enter their fold's evidence: making them all losses changes nothing of it.
    changed = fit_text_effects(exact, {**users, "user0": window(0, 3, 0)})
    assert changed.text_effect_for("user0") == model.text_effect_for("user0")
    assert PopulationModel.from_dict(model.to_dict()).text_effects == model.text_effects
    assert not fit_text_effects(exact, {f"user{i}": window(1, 1, 1) for i in range(30)}).text_effect_for("user0").pays()
