from dataclasses import replace

import pytest

from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.program.agent import ABLATIONS, METHODS
from personaagent.program.lm import UsageMeter, use_lm
from personaagent.program.memory import Profile
from personaagent.program.persona import Persona
from personaagent.program.store import UserStore
from personaagent.program.testing import fake_lm


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


def test_the_persona_is_the_answer_instruction_and_its_choices_shape_the_call(store):
    persona = Persona("Alice plays guitar.", ["rates strings highly"], ["answer with a digit"],
                      sources=["search_memory"], k=1, demos=[{"question": "review: a DEMO-CAPO", "answer": "3"}])
    program = store.build("alice", TASK, persona)
    assert program.answer.signature.instructions == persona.render() and program.plan is None
    lm = fake_lm({"answer": "4"})
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = program(question="What is the score of this review? review: lovely new guitar strings")
    # One call, no planning: the compiled sources are called, the demos shown.
    assert usage.calls == 1 and [s["tool"] for s in pred.trajectory] == ["search_memory"]
    prompt = lm.engine.requests[-1]
    assert "guitar strings sound bright" in prompt and "strap broke" not in prompt  # k=1
    assert "DEMO-CAPO" in prompt and "Alice plays guitar." in prompt
    assert pred.answer == "4" and abs(sum(pred.label_scores.values()) - 1) < 1e-9 and pred.scoring == "likelihood"
    program.set_persona(replace(persona, summary="Alice is strict.", sources=["answer_habits"], demos=[]))
    with use_lm(lm):
        program(question="review: lovely new strings")
    assert "Alice is strict." in lm.engine.requests[-1] and "mean 3.50" in lm.engine.requests[-1]
    assert "DEMO-CAPO" not in lm.engine.requests[-1]


def test_evidence_weights_shift_the_lms_distribution(store):
    """The LM says 4; Alice's past answers are 5 and 2. Weighing her habits moves the answer."""
    program = store.build("alice", TASK, Persona("Alice.", sources=[], weights={"lm": 0.25, "answer_habits": 2.0}))
    with use_lm(fake_lm({"answer": "4"})):
        pred = program(question="review: lovely new strings")
    assert pred.lm_scores["4"] > 0.9 and pred.label_scores["4"] < pred.lm_scores["4"]
    assert pred.label_scores["5"] > pred.lm_scores["5"] and set(pred.evidence) == {"answer_habits", "search_memory"}


def test_a_new_users_rating_habits_are_evidence_never_prompt_text(store):
    """A small model copies a mean rating shown to it, whatever the review: a new user's prompt
    holds the review alone, while their habits still weigh in once alignment fits them a weight."""
    program = store.build("alice", TASK)
    lm = fake_lm({"answer": "4"})
    with use_lm(lm):
        pred = program(question="review: lovely new strings")
    assert pred.trajectory == [] and "mean" not in lm.engine.requests[-1] and "bright" not in lm.engine.requests[-1]
    assert pred.evidence["answer_habits"]["5"] > pred.evidence["answer_habits"]["4"]


def test_react_plans_then_uses_the_tools_it_chooses_in_two_calls(store):
    lm = fake_lm({"tools": ["search_memory", "answer_habits"], "memory_query": "guitar strings", "answer": "4"})
    program = store.build("alice", TASK, method="react")
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = program(question="What is the score of this review? review: lovely new strings")
    assert pred.answer == "4" and usage.calls == 2
    assert [step["tool"] for step in pred.trajectory] == ["search_memory", "answer_habits"]
    assert pred.trajectory[0]["args"] == {"query": "guitar strings"}
    assert "guitar strings sound bright" in pred.context and "mean 3.50" in pred.context
    assert "the user's answer: 5" in lm.engine.requests[-1]  # the answer call saw the tool results


def test_the_plan_of_a_long_templated_question_sees_what_it_is_about(store):
    lm = fake_lm({"tools": ["search_memory"], "memory_query": "strings", "answer": "4"})
    template = "What is the score of the following review? Answer with 1 to 5 only. " + "Rules: be fair. " * 40
    with use_lm(lm):
        store.build("alice", TASK, method="react")(question=template + "review: the zebrawood neck warped within a week")
    plan_prompt = lm.engine.requests[0]
    assert "zebrawood neck warped within a week" in plan_prompt and "What is the score" in plan_prompt
    assert plan_prompt.count("be fair") < 40 == lm.engine.requests[1].count("be fair")  # the answer gets it all


def test_the_ablations_remove_what_they_name(store):
    persona = Persona("Alice plays guitar.", sources=["search_memory"], demos=[{"question": "review: DEMO", "answer": "3"}],
                      weights={"answer_habits": 1.0})
    lm = fake_lm({"answer": "4"})
    prompts = {}
    for name, ablate in ABLATIONS.items():
        with use_lm(lm):
            pred = ablate(store.build("alice", TASK, persona))(question="review: new guitar strings")
        prompts[name] = (lm.engine.requests[-1], pred)
    prompt, _ = prompts["nopersona"]
    assert "Alice plays guitar." not in prompt and "guitar strings sound bright" in prompt and "DEMO" in prompt
    prompt, pred = prompts["nomemory"]
    assert "Alice plays guitar." in prompt and "sound bright" not in prompt and "DEMO" not in prompt
    assert pred.label_scores == pred.lm_scores  # no evidence weighed
    prompt, pred = prompts["noaction"]
    assert "Alice plays guitar." in prompt and "sound bright" not in prompt and "DEMO" in prompt and not pred.trajectory


@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_in_the_task_type_within_two_calls(store, method):
    lm = fake_lm({"tools": ["read_profile"], "answer": "5"})
    program = store.build("alice", TASK, method=method)
    with use_lm(lm), UsageMeter(lm) as usage:
        pred = program(question="review: solid tuner")
    assert pred.answer in TASK.labels
    assert usage.calls == (2 if method == "react" else 1)
    assert abs(sum(pred.label_scores.values()) - 1) < 1e-9


# Carol's history, oldest first: what each method may show of it.
HISTORY = [("review: these guitar strings sound bright", "5"), ("review: the strap broke after a week", "2"),
           ("review: a tuner that holds pitch", "4"), ("review: nylon guitar strings, warm and soft", "5"),
           ("review: a capo that slips", "1")]
PROFILE = "Carol plays guitar and rates gear generously.\n- likes Fender"
HABITS = "5 past ratings, mean 3.40; count per rating: 5: 2, 4: 1, 2: 1, 1: 1."


def _shown(*positions: int) -> str:
    return "\n".join(f"- {HISTORY[i][0]}\n  -> the user's answer: {HISTORY[i][1]}" for i in positions)


@pytest.mark.parametrize("method,context", [
    ("none", "(nothing)"),
    ("icl", _shown(3, 4)),  # the k most recent
    ("rag", _shown(0, 3)),  # the k most similar to the question
    ("membank", f"Profile: {PROFILE}\nSimilar past interactions:\n{_shown(0, 3)}"),
    ("react", f"[search_memory]\n{_shown(0, 3)}\n\n[answer_habits]\n{HABITS}"),  # the tools its plan chose
    ("persona", f"[read_profile]\n{PROFILE}\n\n[search_memory]\n{_shown(0, 3)}"),  # the persona's sources
])
def test_each_method_shows_the_lm_its_own_context(store, method, context):
    store.memory("carol").add([Interaction(text, answer, float(i)) for i, (text, answer) in enumerate(HISTORY)])
    store.save_profile("carol", Profile("Carol plays guitar and rates gear generously.", ["likes Fender"], 5))
    persona = Persona("Carol is generous.", sources=["read_profile", "search_memory"], k=2)
    program = (store.build("carol", TASK, persona) if method == "persona"
               else store.build("carol", TASK, method=method, k=2))
    lm = fake_lm({"tools": ["search_memory", "answer_habits"], "memory_query": "guitar strings", "answer": "4"})
    with use_lm(lm):
        pred = program(question="review: bright new guitar strings")
    *plan, answer = lm.engine.requests
    assert answer.split("[[ ## context ## ]]\n")[-1].split("\n\nRespond with")[0] == context
    assert "review: bright new guitar strings" in answer and pred.answer == "4"
    assert ("Carol is generous." in answer) == (method == "persona")
    # Only ReAct plans: one call that sees the question and every tool, before the answer.
    assert len(plan) == (method == "react")
    assert not plan or ("review: bright new guitar strings" in plan[0] and "compare_candidates" not in plan[0]
                        and all(f"{tool}:" in plan[0] for tool in ("search_memory", "read_profile", "answer_habits")))


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


def test_memory_is_searched_by_what_the_question_is_about_not_by_the_tasks_wording(tmp_path, embedder):
    """A LaMP-2N question lists every category: searched whole, it finds the past article that
    uses those words, not the one about the same thing."""
    task = LAMP_TASKS["LaMP-2N"]
    store = UserStore(tmp_path, embedder)
    store.memory("carol").add([
        Interaction("title: Passenger Punches Flight Attendant | text: The flyer was banned for life by the airline.",
                    "crime", 1.0),
        Interaction("title: Which category fits best? | text: Comedy, business, politics, sports, travel, science "
                    "and entertainment news, the education and environment categories explained.", "entertainment", 2.0)])
    question = task.to_interaction({"category": "crime", "title": "Airline Flyer Banned For Life",
                                    "text": "He punched a flight attendant."}, []).input
    program = store.build("carol", task, method="rag", k=1)
    assert task.subject(question) == "Airline Flyer Banned For Life. He punched a flight attendant."
    assert program.strategy.context(program, question, []).startswith("- title: Passenger Punches")
    search = program.tools["search_memory"]
    assert search(query=question).startswith("- title: Passenger Punches")
    found = store.build("carol", task, Persona(sources=["search_memory"], k=1)).evidence(question)["search_memory"]
    assert max(found, key=found.get) == "crime"
    store.close()


def test_a_styled_text_is_not_shown_the_topic_profile_but_other_free_text_is():
    from personaagent.data.tasks import LAMP_TASKS, generic_task
    from personaagent.program.agent import default_sources

    assert default_sources(LAMP_TASKS["LaMP-4"]) == ["search_memory"]  # the persona text states the style
    assert default_sources(generic_task("generation")) == ["read_profile", "search_memory"]
