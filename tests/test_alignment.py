import dspy
import pytest

from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.optimizers.persona import PersonaAlignment
from personaagent.program.lm import UsageMeter, use_lm
from personaagent.program.memory import Profile
from personaagent.program.store import UserStore

from conftest import fake_lm

TASK = LAMP_TASKS["LaMP-3"]
QUESTIONS = [f"What is the score of the following review? review: product number {i} arrived late and scratched" for i in range(4)]


@pytest.fixture
def program(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.memory("alice").add([Interaction(f"review: product number {i} arrived late", "2", float(i)) for i in range(4)])
    store.save_profile("alice", Profile("Alice rates everything 5.", ["generous"], 4))
    yield store.build("alice", TASK)
    store.close()


def _trainset():
    return [dspy.Example(question=q, answer="2", as_of=i).with_inputs("question", "as_of") for i, q in enumerate(QUESTIONS)]


def _rewrites(summary="Alice is a strict reviewer who punishes late delivery."):
    return {"tools": ["answer_habits"], "answer": "5", "notes": ["late delivery means a low score"],
            "gradient": "Alice gives low scores to late or damaged deliveries.", "summary": summary,
            "preferences": ["punishes late delivery"], "rules": ["late or damaged: answer 2"]}


def test_one_iteration_costs_2n_plus_2_calls_and_rewrites_the_persona(program):
    lm = fake_lm(_rewrites())
    with use_lm(lm), UsageMeter(lm) as usage:
        aligned = PersonaAlignment(n_recent=3).compile(program, trainset=_trainset())
    assert usage.calls == 2 * 3 + 2
    assert "strict reviewer" in aligned.instructions and "strict reviewer" not in program.instructions
    assert [s.iteration for s in aligned.alignment] == [0, 1]
    assert aligned.alignment[0].score == 0.25 and aligned.alignment[1].accepted  # answered 5, user gave 2
    assert "late or damaged deliveries" in aligned.alignment[1].feedback
    # Only the latest n interactions were replayed, each with memory as it was before it.
    replayed = [r for r in lm.engine.requests if "product number" in r and "Case 1" not in r]
    assert not any("product number 0 arrived late and scratched" in r for r in replayed)


def test_replay_hides_the_replayed_interaction_from_memory(program):
    lm = fake_lm({**_rewrites(), "tools": ["search_memory"], "memory_query": "late"})
    with use_lm(lm):
        PersonaAlignment(n_recent=1).compile(program, trainset=_trainset())
    answer_prompt = lm.engine.requests[1]
    assert "- review: product number 2 arrived late" in answer_prompt  # memory before the replayed one
    assert "- review: product number 3 arrived late" not in answer_prompt


COPIED = "Alice said: What is the score of the following review? review: product number 3 arrived late and scratched"


@pytest.mark.parametrize("rewrite, note", [
    (_rewrites(summary=COPIED), "copies example text"),
    ({**_rewrites(), "preferences": "1.1.1.1.1.1"}, "did not parse"),  # not a list: what a rambling small model sends
])
def test_a_degenerate_or_unparseable_rewrite_is_rejected_and_the_persona_kept(program, rewrite, note):
    with use_lm(fake_lm(rewrite)):
        aligned = PersonaAlignment(n_recent=3).compile(program, trainset=_trainset())
    step = aligned.alignment[1]
    assert not step.accepted and note in step.note
    assert aligned.instructions == program.instructions


def test_guarded_acceptance_keeps_the_old_persona_when_the_score_drops(program):
    # Answers "2" (right) under the initial persona and "5" (wrong) once the persona was rewritten.
    lm = fake_lm({**_rewrites(), "answer": lambda prompt: "5" if "strict reviewer" in prompt else "2"})
    with use_lm(lm), UsageMeter(lm) as usage:
        aligned = PersonaAlignment(n_recent=3, acceptance="guarded").compile(program, trainset=_trainset())
    assert usage.calls == 2 * 3 + 2 + 2 * 3
    assert [s.score for s in aligned.alignment] == [1.0, 0.25]
    assert not aligned.alignment[1].accepted and aligned.instructions == program.instructions


def test_the_reflection_lm_is_separate(program):
    answering, reflecting = fake_lm(_rewrites()), fake_lm(_rewrites())
    with use_lm(answering):
        PersonaAlignment(n_recent=2, reflection_lm=reflecting).compile(program, trainset=_trainset())
    assert len(answering.engine.requests) == 4 and len(reflecting.engine.requests) == 2


def test_student_is_not_modified_and_bad_settings_are_refused(program):
    before = program.instructions
    with use_lm(fake_lm(_rewrites())):
        PersonaAlignment(iterations=2).compile(program, trainset=_trainset())
    assert program.instructions == before
    with pytest.raises(ValueError, match="acceptance"):
        PersonaAlignment(acceptance="sometimes")
    with pytest.raises(ValueError, match="at least one past interaction"):
        PersonaAlignment().compile(program, trainset=[])
