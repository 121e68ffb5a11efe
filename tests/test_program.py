import pytest

from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.program.agent import METHODS
from personaagent.program.lm import UsageMeter, use_lm
from personaagent.program.memory import Profile
from personaagent.program.persona import Persona
from personaagent.program.store import UserStore

from conftest import fake_lm

TASK = LAMP_TASKS["LaMP-3"]


@pytest.fixture
def store(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.memory("alice").add([Interaction("review: these guitar strings sound bright", "5"),
                               Interaction("review: the strap broke after a week", "2")])
    store.save_profile("alice", Profile("Alice plays guitar and rates gear generously.", ["likes Fender"], 2))
    store.memory("bob").add([Interaction("review: BOB-SECRET lipstick smudges", "1")])
    yield store
    store.close()


def test_persona_is_the_instruction_of_every_predictor(store):
    persona = Persona("Alice plays guitar.", ["rates strings highly"], ["answer with a digit"])
    program = store.build("alice", TASK, persona)
    for _, predictor in program.named_predictors():
        assert predictor.signature.instructions.startswith(persona.render(TASK))
    program.set_persona(Persona("Alice is strict.", [], []))
    assert "Alice is strict." in program.answer.signature.instructions
    assert "Alice is strict." in program.plan.signature.instructions


def test_agent_uses_the_tools_it_chooses_in_two_calls(store):
    lm = fake_lm({"tools": ["search_memory", "answer_habits"], "memory_query": "guitar strings", "answer": "4"})
    program = store.build("alice", TASK)
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = program(question="What is the score of this review? review: lovely new strings")
    assert pred.answer == "4" and usage.calls == 2
    assert [step["tool"] for step in pred.trajectory] == ["search_memory", "answer_habits"]
    assert pred.trajectory[0]["args"] == {"query": "guitar strings"}
    assert "guitar strings sound bright" in pred.context and "mean 3.50" in pred.context
    # The answer call saw the tool results.
    assert "the user's answer: 5" in lm.engine.requests[-1]


def test_the_plan_of_a_long_templated_question_sees_what_it_is_about(store):
    lm = fake_lm({"tools": ["search_memory"], "memory_query": "strings", "answer": "4"})
    template = "What is the score of the following review? Answer with 1 to 5 only. " + "Rules: be fair. " * 40
    with use_lm(lm):
        store.build("alice", TASK)(question=template + "review: the zebrawood neck warped within a week")
    plan_prompt = lm.engine.requests[0]
    assert "zebrawood neck warped within a week" in plan_prompt and "What is the score" in plan_prompt
    assert plan_prompt.count("be fair") < 40 == lm.engine.requests[1].count("be fair")  # the answer gets it all


@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_in_the_task_type_within_two_calls(store, method):
    lm = fake_lm({"tools": ["read_profile"], "answer": "5"})
    program = store.build("alice", TASK, method=method)
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = program(question="review: solid tuner")
    assert pred.answer in TASK.labels
    assert usage.calls == (2 if method in ("react", "persona") else 1)


def test_one_users_data_never_reaches_another_users_prompt(store):
    engine_lm = fake_lm({"tools": ["search_memory", "read_profile", "answer_habits"], "memory_query": "lipstick", "answer": "3"})
    for method in METHODS:
        with use_lm(engine_lm):
            store.build("alice", TASK, method=method)(question="review: lipstick that smudges")
    requests = engine_lm.engine.requests
    assert requests and not any("BOB-SECRET" in r for r in requests)
    assert any("guitar strings sound bright" in r for r in requests)


def test_unknown_method_is_refused(store):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        store.build("alice", TASK, method="magic")
