from dataclasses import replace

import pytest

from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.optimizers.persona import (ACCEPTANCE, Aligned, PersonaAlignment, Score, Unaligned, past_interaction,
                                             sign_test)
from personaagent.optimizers.population import Combination, TextEffect
from personaagent.program.lm import UsageMeter, use_lm
from personaagent.program.memory import Cutoff, Profile
from personaagent.program.persona import Persona
from personaagent.program.store import UserStore
from personaagent.program.testing import fake_lm

from conftest import HEADLINES


TASK = LAMP_TASKS["LaMP-3"]
N = 7  # one older interaction, a validation window of 3, 3 replays
ITEMS = ["nylon picks", "brass capo", "maple neck", "steel strings", "felt pads", "cable ties", "drum throne"]
QUESTIONS = [f"What is the score of the following review? review: the {item} arrived late and scratched" for item in ITEMS]


@pytest.fixture
def store(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.memory("alice").add([Interaction(q, "2", float(i)) for i, q in enumerate(QUESTIONS)])
    store.save_profile("alice", Profile("Alice rates everything 5.", ["generous"], N))
    yield store
    store.close()


@pytest.fixture
def program(store):
    return store.build("alice", TASK)


def _trainset(gold="2"):
    return [past_interaction(q, gold, Cutoff(Interaction(q, "2", float(i)).key, float(i))) for i, q in enumerate(QUESTIONS)]


def _reflection(summary="Alice is a strict reviewer who punishes late delivery.", **extra):
    return {"notes": ["late delivery means a low score"], "gradient": "Alice gives low scores to late deliveries.",
            "summary": summary, "preferences": ["punishes late delivery"], "rules": ["late or damaged: answer 2"],
            "show_tools": ["answer_habits"], **extra}


FIXED = 1e9  # a prior strength no evidence moves: the adaptation keeps the plain LM, so the rewrite is tested alone


def _align(program, answer, acceptance="validated", strength=FIXED, **reflection):
    """Aligns on the fixture's history (the user always gave 2)."""
    lm = fake_lm({**_reflection(**reflection), "answer": answer})
    with use_lm(lm), UsageMeter(lm) as usage:
        aligned = PersonaAlignment(n_recent=3, acceptance=acceptance).align(
            program, trainset=_trainset(), strength=strength)
    return aligned, usage, lm


def test_one_iteration_stays_within_ten_calls_and_every_candidate_has_a_validation_score(program):
    # Wrong ("5") under the initial persona, right ("2") once rewritten: the rewrite is kept.
    aligned, usage, _ = _align(program, lambda p: "2" if "strict reviewer" in p else "5")
    assert usage.calls == 3 + 3 + 1 + 3 <= 10
    initial, adapted, rewrite = aligned.versions
    assert initial.score == adapted.score == 0.25 and rewrite.score == 1.0 and rewrite.accepted
    weights = adapted.persona.weights  # the plain LM, as fixed
    assert weights["lm"] == pytest.approx(1.0) and all(abs(w) < 1e-6 for name, w in weights.items() if name != "lm")
    assert rewrite.likelihood > initial.likelihood
    assert "strict reviewer" in aligned.current.instructions["answer"] and "strict reviewer" not in program.instructions
    assert aligned.current.persona.demos == [{"question": QUESTIONS[0], "answer": "2"}]  # older than the window
    assert set(aligned.timings) == {"history", "adaptation", "reflection", "validation"}


def test_the_optimizer_returns_its_versions_and_timings_and_compile_the_program_they_end_in(program):
    # What an alignment ran and where its time went are returned, not set on the program; DSPy's
    # `compile` gives the program restored to the last accepted version.
    lm = fake_lm({**_reflection(), "answer": lambda p: "2" if "strict reviewer" in p else "5"})
    teleprompter = PersonaAlignment(n_recent=3)
    with use_lm(lm):
        aligned = teleprompter.align(program, trainset=_trainset(), strength=FIXED)
        compiled = teleprompter.compile(program, trainset=_trainset(), strength=FIXED)
    assert isinstance(aligned, Aligned) and aligned.current is aligned.versions[-1] and aligned.timings
    assert not hasattr(compiled, "alignment") and not hasattr(compiled, "timings")
    assert compiled.persona == aligned.current.persona
    assert compiled.instructions_by_predictor() == aligned.current.instructions != program.instructions_by_predictor()
    unaligned = Unaligned().align(program)
    assert unaligned.timings == {} and [v.note for v in unaligned.versions] == ["initial persona"]


def _wrong_on_replays_and_once_rewritten(prompt: str) -> str:
    """Misses the replays (the latest three) under any persona, gets the earlier window right
    under the initial persona only."""
    question = _field(prompt, "question")
    return "5" if "strict reviewer" in prompt or any(item in question for item in ITEMS[4:]) else "2"


def test_a_worse_scoring_candidate_is_never_accepted(program):
    current = Score(1.0, -0.1, (1.0, 1.0, 1.0))
    assert not ACCEPTANCE["validated"].accept(Score(0.0, -3.0, (0.0, 0.0, 0.0)), current)
    # Here the window is answered right already: no candidate could be better on it, so none is
    # written (no reflection call is spent) and the program keeps its text and demos.
    aligned, usage, _ = _align(program, _wrong_on_replays_and_once_rewritten)
    assert usage.calls == 3 + 3 and len(aligned.versions) == 2
    assert aligned.current.instructions["answer"] == program.instructions and aligned.current.persona.demos == []


def test_on_a_tie_the_simpler_state_stays(program):
    aligned, _, _ = _align(program, "5")  # the same answers (and misses) either way
    assert aligned.versions[-1].score == aligned.versions[0].score and not aligned.versions[-1].accepted
    assert aligned.current.instructions["answer"] == program.instructions


def test_always_takes_the_rewrite_unscored_as_the_paper_does(program):
    aligned, usage, _ = _align(program, _wrong_on_replays_and_once_rewritten, acceptance="always")
    assert usage.calls == 3 + 3 + 1 and aligned.versions[-1].accepted and aligned.versions[-1].score is None
    assert "strict reviewer" in aligned.current.instructions["answer"]


def test_the_adaptation_learns_the_users_habit_without_an_lm_call(program):
    """The LM always says 5; this user always gives 2. Adapted from the plain LM with a weak prior,
    their habit and the label's own offset outweigh the LM, and then decide the answer."""
    aligned, usage, lm = _align(program, "5", strength=0.3)
    adapted = aligned.versions[1]
    assert adapted.accepted and adapted.persona.weights.get("answer_habits", 0) > 0 and adapted.persona.bias["2"] > 0
    assert adapted.score > aligned.versions[0].score
    assert usage.calls == 3 + 3  # the answers it learned from; then every replay was right: no reflection
    program.load_version(aligned.current)
    with use_lm(lm):
        pred = program(question="What is the score of the following review? review: it arrived late again")
    assert pred.answer == "2" and pred.lm_scores["5"] > 0.9 and abs(sum(pred.label_scores.values()) - 1) < 1e-9


def test_the_adaptation_starts_from_the_population_model(program):
    """A population that learned to trust this task's habits answers the user's way from the start;
    six items of theirs under a strong prior barely move it."""
    population = Combination({"lm": 0.5, "answer_habits": 3.0}, {})
    lm = fake_lm({**_reflection(), "answer": "5"})
    with use_lm(lm):
        aligned = PersonaAlignment(n_recent=3).align(program, trainset=_trainset(), population=population, strength=100.0)
    weights = aligned.versions[1].persona.weights
    assert abs(weights["lm"] - 0.5) < 0.1 and abs(weights["answer_habits"] - 3.0) < 0.1
    assert "population model (fitted on other users)" in aligned.versions[1].note


def test_a_text_is_accepted_only_when_a_sign_test_says_it_is_better():
    current = Score(1 / 3, -1.2, (1.0, 0.0, 0.0))
    assert sign_test(3, 0) == 0.125 and sign_test(2, 0) == 0.25 and sign_test(4, 1) == 0.1875
    assert not Score(2 / 3, -0.7, (1.0, 1.0, 0.0)).beats(current)  # one more right: p = 1/2
    assert not Score(1.0, -0.5, (1.0, 1.0, 1.0)).beats(current)  # two of two: p = 1/4
    assert Score(1.0, -0.5, (1.0, 1.0, 1.0)).beats(Score(0.0, -2.0, (0.0, 0.0, 0.0)))  # three of three: 1/8
    assert not Score(1 / 3, -1.0, (0.0, 1.0, 0.0)).beats(current)  # a win and a loss
    assert not Score(1.0, -0.1, (1.0,)).beats(Score(0.0, -2.0, (0.0,)))  # a window of one proves nothing


@pytest.mark.parametrize("reflection, note", [
    ({"summary": f"Alice said: {QUESTIONS[6]}"}, "copies example text"),
    ({"preferences": ["loves cable ties from this shop"]}, "names items from the examples"),
    ({"preferences": "1.1.1.1.1.1"}, "did not parse"),  # not a list: what a rambling small model sends
])
def test_a_degenerate_or_unparseable_rewrite_is_rejected_unscored(program, reflection, note):
    aligned, usage, _ = _align(program, "5", **reflection)
    step = aligned.versions[-1]
    assert not step.accepted and note in step.note and step.score is None
    assert usage.calls == 3 + 3 + 1  # no validation spent on it
    assert aligned.current.instructions["answer"] == program.instructions


def test_no_replayed_or_validated_interaction_sees_its_own_record_or_a_later_one(store):
    program = store.build("alice", TASK)
    program.set_persona(replace(program.persona, sources=["search_memory"], k=10))
    lm = fake_lm({**_reflection(show_tools=["search_memory"]), "answer": "2"})
    with use_lm(lm):
        PersonaAlignment(n_recent=3).compile(program, trainset=_trainset())
    answers = [p for p in lm.engine.requests if "Case 1" not in p]
    asked = [next(i for i, q in enumerate(QUESTIONS) if q in _field(p, "question")) for p in answers]
    assert sorted(set(asked)) == [1, 2, 3, 4, 5, 6]  # the window and the replays, not the oldest
    for i, prompt in zip(asked, answers):
        context = _field(prompt, "context")
        seen = {j for j, q in enumerate(QUESTIONS) if q in context}
        assert seen and max(seen) < i, (i, seen)


def _field(prompt: str, name: str) -> str:
    """The value of an input field in the prompt's last user message."""
    return prompt.split(f"[[ ## {name} ## ]]")[-1].split("[[ ## ")[0]


def test_the_reflection_lm_is_separate(program):
    answering, reflecting = fake_lm({"answer": "5"}), fake_lm(_reflection())
    with use_lm(answering):
        PersonaAlignment(n_recent=2, reflection_lm=reflecting).compile(program, trainset=_trainset(), strength=FIXED)
    assert len(reflecting.engine.requests) == 1 and len(answering.engine.requests) == 3 + 2 + 3


def test_no_reflection_without_a_loss(program):
    aligned, usage, _ = _align(program, "2")  # every replay right: nothing to learn from
    assert usage.calls == 3 + 3 and len(aligned.versions) == 2  # the initial state and its adaptation


def test_the_budget_shrinks_the_validation_window(program):
    teleprompter = PersonaAlignment(n_recent=3, validation=3, max_lm_calls=6)
    older, window, replays = teleprompter.windows(_trainset())
    assert len(replays) == 3 and len(window) == 1 and len(older) == 3  # 1 + 3 + 1 + 1 = 6 calls


def test_student_is_not_modified_and_bad_settings_are_refused(program):
    before = program.instructions
    with use_lm(fake_lm({**_reflection(), "answer": lambda p: "2" if "strict" in p else "5"})):
        PersonaAlignment(iterations=2, max_lm_calls=20).compile(program, trainset=_trainset())
    assert program.instructions == before
    with pytest.raises(ValueError, match="acceptance"):
        PersonaAlignment(acceptance="sometimes")
    with pytest.raises(ValueError, match="at least one past interaction"):
        PersonaAlignment().compile(program, trainset=[])


ARTICLES = [f"Generate a headline for the following article: story number {i} about events" for i in range(len(HEADLINES))]
WINDOW = ARTICLES[-6:-3]  # with 3 replays and a window of 3: the 5 headlines before it teach the style


@pytest.fixture
def headlines(tmp_path, embedder):
    """A LaMP-4 user who writes Title Case headlines with a colon, and their program."""
    store = UserStore(tmp_path, embedder)
    store.memory("hana").add([Interaction(a, h, float(i)) for i, (a, h) in enumerate(zip(ARTICLES, HEADLINES))])
    trainset = [past_interaction(a, h, Cutoff(Interaction(a, h, float(i)).key, float(i)))
                for i, (a, h) in enumerate(zip(ARTICLES, HEADLINES))]
    yield store.build("hana", LAMP_TASKS["LaMP-4"]), trainset
    store.close()


def _headline_lm(styled, plain="events happen"):
    """An LM writing `styled(article)` under a persona that states Title Case, else `plain(article)`."""
    gold = dict(zip(ARTICLES, HEADLINES))

    def headline(prompt: str) -> str:
        article = _field(prompt, "question").strip()
        write = styled if "Title Case" in prompt else plain
        return write(article, gold[article]) if callable(write) else write
    return fake_lm({"answer": headline})


def test_a_generation_rewrite_states_the_users_style_from_their_history(headlines):
    """The assistant writes short lower-case headlines; the user writes Title Case with a colon. The
    rewrite states that style (computed from the headlines before the validation window), copies
    none, names no topic, and is kept only because its headlines are better on the window."""
    program, trainset = headlines
    lm = _headline_lm(lambda article, gold: gold)
    with use_lm(lm), UsageMeter(lm) as usage:
        aligned = PersonaAlignment(n_recent=3).align(program, trainset=trainset)
    rewrite = aligned.versions[-1]
    assert rewrite.accepted and rewrite.score == 1.0 > aligned.versions[0].score
    rules = rewrite.persona.rules
    assert "Write about 6 words." in rules and any("Title Case" in r for r in rules)
    assert any("colon" in r and "100%" in r for r in rules) and any("Never use" in r and "a question" in r for r in rules)
    assert "length: the assistant wrote 2 words, the user" in rewrite.feedback
    assert not any(h.lower() in aligned.current.instructions["answer"].lower() for h in HEADLINES)
    # The window, then the window under the computed text: no replays (the text is computed from
    # the history, not learned from answers), no reflection LM call, no second validation.
    assert usage.calls == 3 + 3


def test_a_style_is_computed_once_and_only_from_past_texts(headlines):
    program, trainset = headlines
    lm = _headline_lm(lambda article, gold: gold)
    with use_lm(lm), UsageMeter(lm) as usage:
        twice = PersonaAlignment(n_recent=3, iterations=2, max_lm_calls=30).align(program, trainset=trainset)
    # A second iteration would compute the same text again: it does not run, nor replay anything.
    assert usage.calls == 3 + 3 and [v.accepted for v in twice.versions[1:]] == [True]
    # Six interactions: three replays and a window of three, no past text to compute a style from.
    with use_lm(lm), UsageMeter(lm) as usage:
        early = PersonaAlignment(n_recent=3).align(program, trainset=trainset[:6])
    assert usage.calls == 3 and [v.note for v in early.versions] == ["initial persona"]


def _align_styled(headlines, lm, effect):
    program, trainset = headlines
    with use_lm(lm):
        return PersonaAlignment(n_recent=3).align(program, trainset=trainset, text_effect=effect)


def test_a_computed_text_is_kept_on_the_populations_evidence_when_one_users_window_cannot_show_it(headlines):
    # Better on one window item, the same on the others: a sign test on three items cannot pass.
    lm = _headline_lm(lambda article, gold: gold if article == WINDOW[0] else "events happen")
    alone = _align_styled(headlines, lm, None).versions[-1]
    assert not alone.accepted and "sign test" in alone.note
    backed = _align_styled(headlines, lm, TextEffect(wins=40, losses=15)).versions[-1]
    assert backed.accepted and "won 40 and lost 15" in backed.note and "Title Case" in backed.instructions["answer"]
    # A population where such texts do not pay: no text is written at all.
    unpaid = _align_styled(headlines, lm, TextEffect(wins=20, losses=20)).versions
    assert all("Title Case" not in v.instructions["answer"] for v in unpaid)


def test_a_users_own_window_vetoes_a_computed_text_the_population_backs(headlines):
    # Right on the window without the text, wrong with it: worse on every window item.
    worse = _headline_lm("events happen", plain=lambda article, gold: gold if article in WINDOW else "events happen")
    vetoed = _align_styled(headlines, worse, TextEffect(wins=40, losses=15)).versions[-1]
    assert not vetoed.accepted and "worse on this user's window" in vetoed.note


def test_a_rewrite_that_copies_a_past_headline_is_rejected():
    copied = Persona("Writes sharp political headlines for a news site.", rules=[f"Write like: {HEADLINES[0]}"])
    assert any("copies a past answer" in p for p in copied.problems([], HEADLINES))
    own = Persona("Writes sharp political headlines for a news site.", rules=["Write about 6 words."])
    assert own.problems([], HEADLINES) == []
    # a label is no text to copy
    assert Persona("Files most articles under politics.", rules=["politics"]).problems([], ["politics"]) == []
