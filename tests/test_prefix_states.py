"""Label scoring that keeps each user's prompt prefix, on the real model (SmolLM2-135M through
llama.cpp, in this process): users asked in turns get exactly the scores each prompt gets alone, and
a user's next question evaluates only its own tokens."""

from __future__ import annotations

import pytest

from personaagent.program.lm import MIN_BATCH, LlamaCppEngine

from test_isolation import SMALL, small_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.model
HEADER = ("Your input fields are:\n1. `question` (str): a product review to rate\n2. `context` (str): what the tools "
          "found about this user\nYour output fields are:\n1. `answer` (Literal['1', '2', '3', '4', '5']): the score "
          "the user gives\nAll interactions will be structured in the following way, with the appropriate values "
          "filled in.\n\n[[ ## question ## ]]\n{question}\n\n[[ ## context ## ]]\n{context}\n\n[[ ## answer ## ]]\n"
          "{answer}\n\n[[ ## completed ## ]]\nIn adhering to this structure, your objective is: ")
PERSONAS = {"A": "This user loves vintage guitars and rates warm-sounding strings highly, whatever their price.",
            "B": "This user is hard to please about makeup: a lipstick that smudges gets the lowest score.",
            "C": "This user buys kitchen tools and rates by how easy they are to clean."}
QUESTIONS = ["The strings sound warm but rust in a week.", "A sturdy pan, but food sticks to it.",
             "Lasts all day and the color is lovely."]
LABELS = [f'{{"answer": "{label}"}}' for label in "12345"]


def prompt(user: str, question: str) -> list[dict]:
    return [{"role": "system", "content": HEADER + PERSONAS[user]},
            {"role": "user", "content": "[[ ## question ## ]]\nGood value for the money."},
            {"role": "assistant", "content": '{"answer": "4"}'},
            {"role": "user", "content": f"[[ ## question ## ]]\n{question}\n\n[[ ## context ## ]]\n(nothing)"}]


def test_users_asked_in_turns_get_the_scores_each_prompt_gets_alone(small_model):  # noqa: F811
    asked = [("A", 0), ("B", 0), ("A", 1), ("C", 0), ("B", 1), ("A", 0)]
    alone = {}  # (scores, tokens evaluated: all of the prompt's) on a fresh engine
    for user, question in set(asked):
        engine = LlamaCppEngine(SMALL, prefix_cache_mb=0)
        alone[user, question] = engine.score(prompt(user, QUESTIONS[question]), LABELS)
        engine.close()
    engine = LlamaCppEngine(SMALL)
    evaluated = []
    for user, question in asked:
        scores, tokens = engine.score(prompt(user, QUESTIONS[question]), LABELS)
        assert scores == alone[user, question][0], (user, question)
        evaluated.append(tokens)
    # After B, A's next question evaluated its last message (and what precedes it in its batch) only.
    messages = prompt("A", QUESTIONS[1])
    fixed = engine._fixed_prefix(messages, engine._chat(messages=messages).prompt)
    assert evaluated[2] < alone["A", 1][1] - fixed + MIN_BATCH and evaluated[2] < evaluated[1]
    engine.close()
