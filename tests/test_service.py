"""PersonaService, the serving library: real store, SQLite, FAISS and embedder; only the LM is fake."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import dspy
import pytest

from personaagent.data import SAMPLE_DIR, TaskData, load
from personaagent.data.tasks import LAMP_TASKS, Interaction, task_to_dict
from personaagent.optimizers import pipeline
from personaagent.optimizers.compile import compile_users
from personaagent.optimizers.pipeline import CompileConfig
from personaagent.program.memory import Profile
from personaagent.app.service import (AlignmentRunning, InvalidRequest, LMUnavailable, NotFound, PersonaService,
                                          ServiceBusy)
from personaagent.program.persona import Persona, PersonaVersion
from personaagent.optimizers.population import Combination, PopulationModel
from personaagent.program.store import ProgramState, UserStore
from personaagent.program.testing import FakeEngine

from conftest import interactions

TASK = LAMP_TASKS["LaMP-3"]
REWRITE = {  # what the fake reflection LM writes: a persona that passes the checks
    "summary": "Alice is a moody reviewer whose ratings swing from one extreme to the other.",
    "preferences": ["checks build quality first"],
    "rules": ["rate each review on its own merits"],
    "gradient": "Rate each review on its own instead of generously.",
    "notes": ["the ratings swing"],
}
# The tools a saved persona's answer call is shown: memory search among them, so isolation is tested.
SOURCES = ["search_memory", "read_profile", "answer_habits"]
# Alice's real ratings swing between 1 and 5: neither the LM ("4") nor her label habits predict
# them, so her replays leave a loss for the reflection to learn from.
ALICE = [Interaction(f"review {i}: guitar strings number {i}", rating, float(i)) for i, rating in enumerate("151515")]


class GatedEngine(FakeEngine):
    """A fake LM that counts calls running at once (one llama.cpp context must never see two)
    and can hold calls at a gate: generations and label scorings alike."""

    def __init__(self, answers: dict | None = None):
        super().__init__(answers)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.active = self.most_active = 0

    def _gated(self, call, *args):
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.set()
        try:
            assert self.gate.wait(30)
            time.sleep(0.001)  # a window for another call to overlap, if the service let it
            return call(*args)
        finally:
            with self._lock:
                self.active -= 1

    def complete(self, request):
        return self._gated(super().complete, request)

    def score(self, messages, continuations):
        return self._gated(super().score, messages, continuations)


def question(prompt: str) -> str:
    return re.findall(r"\[\[ ## question ## \]\]\n(.*?)\n", prompt)[-1]


def echo(prompt: str) -> str:
    return "answer to " + question(prompt)


def rating(prompt: str) -> str:
    """The fake LM rates 4, but Alice's real rating once it follows the rewritten persona."""
    real = {item.input: item.output for item in ALICE}
    return real.get(question(prompt), "4") if REWRITE["summary"] in prompt else "4"


def local_lm(engine: FakeEngine) -> dspy.LM:
    """Named like an embedded model: the service then runs one LM call at a time, as llama.cpp needs."""
    return dspy.LM("local/fake", engine=engine, cache=False)


def save_persona(store: UserStore, user_id: str, summary: str) -> ProgramState:
    """What a compile leaves: a program file whose newest version has this persona."""
    persona = Persona(summary, ["likes Fender"], ["answer with a digit"], sources=SOURCES)
    previous = store.load_state(user_id)
    versions = previous.versions if previous else []
    instructions = store.build(user_id, TASK, persona).instructions_by_predictor()
    state = ProgramState(user_id, task_to_dict(TASK), "local/qwen2.5-coder-1.5b",
                         versions + [PersonaVersion(len(versions) + 1, persona, instructions, 0.5)])
    store.save_state(state)
    return state


def wait_for(job, seconds: float = 60):
    """The job, once finished (the service updates the record it returned)."""
    deadline = time.time() + seconds
    while job.status in ("queued", "running"):
        assert time.time() < deadline, "alignment did not finish"
        time.sleep(0.02)
    return job


@pytest.fixture
def store(tmp_path, embedder):
    store = UserStore(tmp_path / "store", embedder)
    store.memory("alice").add(ALICE)
    save_persona(store, "alice", "Alice rates guitar gear generously.")
    return store


@pytest.fixture
def engine():
    return GatedEngine({"answer": rating, **REWRITE})


@pytest.fixture
def service(store, engine):
    service = PersonaService(store, local_lm(engine))
    yield service
    engine.gate.set()
    service.close()


def test_answers_with_the_persona_in_force_and_picks_up_a_new_version_without_restart(service, store, engine):
    first = service.answer("alice", "review: bright strings")
    # One LM call, the persona's sources called before it: no planning call chooses them.
    assert (first.answer, first.persona_version, first.tools) == ("4", 1, SOURCES) and len(engine.requests) == 1
    assert "Alice rates guitar gear generously." in engine.requests[-1]
    assert "guitar strings number" in engine.requests[-1]  # her memory was searched
    assert first.scoring == "likelihood" and first.confidence == first.label_scores["4"] == max(first.label_scores.values())
    assert service.program("alice") is service.program("alice")  # unchanged files: no reload

    save_persona(store, "alice", "Alice became a strict critic of guitar gear.")
    second = service.answer("alice", "review: bright strings")
    assert second.persona_version == 2
    assert "Alice became a strict critic" in engine.requests[-1] and "generously" not in engine.requests[-1]


def test_keeps_only_the_most_recently_used_programs_loaded(store, engine):
    for user in ("bob", "carol"):
        store.memory(user).add(interactions(2, user))
        save_persona(store, user, f"{user.title()} likes pedals.")
    with PersonaService(store, local_lm(engine), max_loaded=2) as service:
        for user in ("alice", "bob", "carol", "alice"):
            assert service.answer(user, "review: fine").persona_version == 1
        assert service.loaded == 2


def test_a_user_without_a_compiled_program_gets_the_default_program(service, store, engine):
    store.memory("dave").add([Interaction("write a headline: rain again", "Rain, again")])
    store.save_profile("dave", Profile("Dave writes dry, short headlines.", ["puns"], 1))
    info = service.persona("dave")
    assert not info["compiled"] and info["versions"] == [] and info["current_version"] is None
    assert info["task"]["kind"] == "generation" and info["interactions"] == 1
    assert info["persona"]["sources"] == ["read_profile", "search_memory"]  # a free-text task's default
    engine.answers["answer"] = echo
    answer = service.answer("dave", "write a headline: sun at last")
    assert answer.answer == "answer to write a headline: sun at last" and answer.persona_version is None
    assert answer.tools == ["read_profile", "search_memory"]
    assert "Rain, again" in engine.requests[-1] and "Dave writes dry, short headlines." in engine.requests[-1]
    assert (answer.label_scores, answer.confidence, answer.scoring) == (None, None, None)  # free text: no labels


@pytest.mark.parametrize("user_id", ["../alice", "a/b", "..", "", " x", "x" * 200, "nul\x00"])
def test_invalid_user_ids_are_refused_before_touching_the_disk(service, store, user_id):
    before = sorted(p.name for p in store.root.parent.rglob("*"))
    for call in (lambda: service.answer(user_id, "hi"), lambda: service.add_interaction(user_id, "hi"),
                 lambda: service.persona(user_id), lambda: service.delete(user_id)):
        with pytest.raises(InvalidRequest, match="invalid user id"):
            call()
    assert sorted(p.name for p in store.root.parent.rglob("*")) == before


def test_unknown_users_are_not_found_and_not_created(service, store):
    for call in (lambda: service.answer("carol", "hi"), lambda: service.persona("carol"),
                 lambda: service.align("carol"), lambda: service.delete("carol")):
        with pytest.raises(NotFound, match="unknown user 'carol'"):
            call()
    assert not store.user_dir("carol").exists()


def test_concurrent_appends_are_never_lost(service, store):
    def append(worker: int) -> list[tuple[str, int]]:
        user = "alice" if worker % 2 else "erin"
        return [(user, *service.add_interaction(user, f"worker {worker} item {i}", str(i % 5 + 1))) for i in range(25)]

    with ThreadPoolExecutor(8) as pool:
        added = [record for batch in pool.map(append, range(8)) for record in batch]
    assert len(set(added)) == 200  # each append got its own record id
    reopened = UserStore(store.root, store.embedder)  # what is on disk, not what is cached
    assert len(reopened.memory("alice")) == len(ALICE) + 100 and len(reopened.memory("erin")) == 100
    assert {r.input for r in reopened.memory("erin").all()} == {f"worker {w} item {i}" for w in (0, 2, 4, 6) for i in range(25)}
    # A retried append (same interaction, same timestamp) is recorded once.
    assert service.add_interaction("erin", "retried", "5", timestamp=1.0) and not service.add_interaction("erin", "retried", "5", timestamp=1.0)
    reopened.close()


def test_concurrent_answers_queue_for_the_model_and_each_gets_its_own(service, store, engine):
    store.memory("frank").add(interactions(2, "frank"))
    engine.answers["answer"] = echo
    questions = [(user, f"question {i}") for i in range(12) for user in ("frank", "george")]
    store.memory("george").add(interactions(2, "george"))
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda q: service.answer(*q), questions))
    assert [a.answer for a in answers] == [f"answer to {text}" for _, text in questions]
    assert [a.user_id for a in answers] == [user for user, _ in questions]
    assert engine.most_active == 1


def test_a_full_queue_turns_callers_away_with_a_retry_hint(store, engine):
    with PersonaService(store, local_lm(engine), max_queued=2) as service:
        engine.gate.clear()
        waiting = [service.submit_answer("alice", "review: ok") for _ in range(2)]
        with pytest.raises(ServiceBusy, match="2 answers are queued") as busy:
            service.submit_answer("alice", "review: ok")
        assert busy.value.retry_after >= 1
        engine.gate.set()
        assert [f.result(30).answer for f in waiting] == ["4", "4"]
        assert service.answer("alice", "review: ok").answer == "4"


def test_an_answer_past_its_deadline_or_cancelled_never_reaches_the_lm(store, engine):
    with PersonaService(store, local_lm(engine), answer_deadline=0.3) as service:
        service._answer_seconds = 0.01  # as if answers were quick: the queue is accepted
        engine.gate.clear()
        running = service.submit_answer("alice", "review: first")
        assert engine.entered.wait(10)
        late, cancelled = service.submit_answer("alice", "review: late"), service.submit_answer("alice", "review: gone")
        assert cancelled.cancel() and service.queued == 2
        time.sleep(0.5)
        engine.gate.set()
        assert running.result(30).answer == "4"
        with pytest.raises(ServiceBusy, match="waited over 0.3 s in the queue"):
            late.result(30)
        assert not any("review: late" in r or "review: gone" in r for r in engine.requests) and service.queued == 0


def test_a_queue_too_slow_for_the_deadline_turns_callers_away_at_once(store, engine):
    with PersonaService(store, local_lm(engine), answer_deadline=2.0) as service:
        service._answer_seconds = 5.0  # as if each answer took 5 s
        engine.gate.clear()
        first = service.submit_answer("alice", "review: ok")
        with pytest.raises(ServiceBusy, match="the queue would take about 5 s") as busy:
            service.submit_answer("alice", "review: ok")
        assert busy.value.retry_after == 5
        engine.gate.set()
        assert first.result(30).answer == "4"


def test_an_lm_failure_is_reported_as_unavailable_and_the_service_goes_on(service, engine):
    engine.fail = True
    with pytest.raises(LMUnavailable, match="the language model failed") as failure:
        service.answer("alice", "review: ok")
    assert failure.value.retry_after > 0
    engine.fail = False
    assert service.answer("alice", "review: ok").answer == "4"
    assert service.queued == 0


def test_alignment_records_every_version_and_the_new_persona_is_served(service, store, engine):
    # Validated (the default): the fake LM gets Alice's ratings right only under the rewrite, so
    # the rewrite scores better on her earlier interactions and is kept. The store's population
    # model (as a compile saved it) trusts the LM, and so much that her evidence cannot move it.
    store.save_population(PopulationModel([Combination()] * 5, strength=1e9, users=10, items=60).to_dict())
    engine.gate.clear()
    job = service.align("alice", n_recent=3)
    assert engine.entered.wait(30)
    with pytest.raises(AlignmentRunning, match=job.id):
        service.align("alice")
    engine.gate.set()
    job = wait_for(job)
    assert (job.status, job.error, job.new_versions, job.current_version) == ("succeeded", "", [2, 3], 3)

    state = store.load_state("alice")
    adapted, rewrite = state.versions[1:]
    assert [v.version for v in state.versions] == [1, 2, 3] and state.current.version == 3
    assert adapted.note.startswith("evidence weights and label offsets: the population model (fitted on other users)")
    assert adapted.persona.weights["lm"] == pytest.approx(1.0)
    assert adapted.persona.summary == "Alice rates guitar gear generously."  # no LM call: the text stays
    assert rewrite.accepted and rewrite.score > adapted.score and rewrite.likelihood is not None
    assert rewrite.persona.summary == REWRITE["summary"] and rewrite.persona.sources == SOURCES
    assert REWRITE["gradient"] in rewrite.feedback
    assert rewrite.instructions["answer"].startswith(rewrite.persona.render())
    assert service.persona("alice")["current_version"] == 3
    assert service.answer("alice", "review: ok").persona_version == 3
    assert REWRITE["summary"] in engine.requests[-1]


def test_the_store_and_the_service_run_a_versions_own_instructions_restored_by_one_function(service, store, engine,
                                                                                             monkeypatch):
    # A version holds all it restores, an instruction GEPA rewrote on its own included: the store's
    # program and the service's both run it, and both are restored by `UserStore.restore`.
    state = store.load_state("alice")
    gepa = replace(state.current, version=2, instructions={**state.current.instructions,
                                                          "answer": "Answer as Alice would, in GEPA's words."})
    state.versions.append(gepa)
    store.save_state(state)
    restored = []
    monkeypatch.setattr(UserStore, "restore", lambda self, user_id, task, version, *rest, _run=UserStore.restore:
                        restored.append(version.version) or _run(self, user_id, task, version, *rest))
    assert store.load_program("alice").instructions == "Answer as Alice would, in GEPA's words."
    assert service.program("alice").instructions == "Answer as Alice would, in GEPA's words."
    assert service.answer("alice", "review: bright strings").persona_version == 2
    assert "in GEPA's words" in engine.requests[-1] and restored == [2, 2]


def test_alignment_of_a_default_user_saves_its_first_program(service, store):
    service.add_interaction("hana", "write a headline: rain again", "Rain, again")
    # Validated: with one interaction there is nothing earlier to validate a rewrite on, so there is
    # no reflection and only the initial persona is saved.
    job = wait_for(service.align("hana", n_recent=1))
    assert job.status == "succeeded" and job.new_versions == [1]
    state = store.load_state("hana")
    assert state.versions[0].note == "initial persona" and state.current.persona.summary != REWRITE["summary"]
    assert service.persona("hana")["compiled"] and store.users() == ["alice", "hana"]
    # The paper's setting takes the rewrite unscored.
    job = wait_for(service.align("hana", n_recent=1, acceptance="always"))
    assert job.status == "succeeded" and (job.new_versions, job.current_version) == ([2], 2)
    state = store.load_state("hana")
    assert state.current.persona.summary == REWRITE["summary"] and state.current.score is None


def test_alignment_needs_interactions_with_a_known_output_and_valid_settings(service):
    service.add_interaction("ivan", "write a headline: no answer yet")
    with pytest.raises(InvalidRequest, match="at least one interaction with a known output"):
        service.align("ivan")
    with pytest.raises(InvalidRequest, match="must be at least 1"):
        service.align("alice", n_recent=0)
    with pytest.raises(InvalidRequest, match="acceptance"):
        service.align("alice", acceptance="sometimes")


def test_delete_forgets_everything_and_a_running_alignment_never_brings_the_user_back(service, store, engine):
    engine.gate.clear()
    job = service.align("alice")
    assert engine.entered.wait(30)
    service.delete("alice")
    engine.gate.set()
    job = wait_for(job)
    assert (job.status, job.error) == ("cancelled", "the user was deleted")
    assert not store.user_dir("alice").exists() and store.users() == []
    with pytest.raises(NotFound):
        service.persona("alice")
    service.add_interaction("alice", "a new start", "3")
    info = service.persona("alice")
    assert not info["compiled"] and info["interactions"] == 1
    with pytest.raises(NotFound):  # the old job was forgotten with the user
        service.job("alice", job.id)


def test_a_queued_alignment_of_a_user_deleted_before_it_runs_replays_nothing_of_theirs(service, store, engine):
    """Deleted while queued, then re-created: the job is cancelled, and the deleted interactions
    never reach the LM (a job reads the replays when it runs, never when it was queued)."""
    store.memory("bob").add([Interaction("review: bob's amp hums", "2", 1.0)])
    save_persona(store, "bob", "Bob dislikes noise.")
    engine.gate.clear()
    running = service.align("bob")
    assert engine.entered.wait(30)
    queued = service.align("alice")
    service.delete("alice")
    service.add_interaction("alice", "review: a new start", "3")
    asked_before = len(engine.requests)
    engine.gate.set()
    assert wait_for(running).status == "succeeded"
    assert (wait_for(queued).status, queued.error) == ("cancelled", "the user was deleted")
    assert not any(item.input in prompt for prompt in engine.requests[asked_before:] for item in ALICE)


def test_online_alignment_starts_after_n_outcomes_and_never_twice_at_once(store, engine):
    with PersonaService(store, local_lm(engine), reflection_lm=local_lm(engine), align_every=2) as service:
        engine.gate.clear()
        service.add_interaction("alice", "review 10: a tuner that drifts", "1", timestamp=10.0)
        assert service.alignments() == {"queued": 0, "running": 0}
        service.add_interaction("alice", "review 11: a capo that slips", "1", timestamp=11.0)  # the second outcome
        assert engine.entered.wait(30)
        assert service.alignments() == {"queued": 0, "running": 1}
        for i in range(12, 16):  # more outcomes while it runs: no second alignment of alice
            service.add_interaction("alice", f"review {i}: strings", "5", timestamp=float(i))
            service.add_interaction("alice", f"a question without an outcome {i}")
        jobs = [j for j in service._jobs.values() if j.user_id == "alice"]
        assert len(jobs) == 1 and jobs[0].trigger == "online: 2 new interactions with known outcomes"
        engine.gate.set()
        job = wait_for(jobs[0])
        assert job.status == "succeeded"
        triggers = {v.trigger for v in service.persona("alice")["versions"] if v.version in job.new_versions}
        assert triggers == {"online: 2 new interactions with known outcomes"}
        service.add_interaction("alice", "review 20: strings", "5", timestamp=20.0)  # the count goes on
        deadline = time.monotonic() + 30
        while len([j for j in service._jobs.values() if j.user_id == "alice"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len([j for j in service._jobs.values() if j.user_id == "alice"]) == 2


def _citing_authors(folder) -> TaskData:
    """LaMP-1 files of two authors with eight papers each. In memory a paper's output is its list of
    references; replayed, it is a choice between two titles, answered with a label."""
    titles = [f"A study of topic {i}" for i in range(12)]
    question = ('For an author who has written the paper with the title "Last", which reference is related? '
                'Just answer with [1] or [2] without explanation. [1]: "One" [2]: "Two"')
    questions = [{"id": f"{author}-q", "user_id": author, "input": question, "profile": [
        {"id": f"{author}{i}", "title": f"Paper {i} of {author}", "abstract": f"We study topic {i}.", "year": 2000 + i,
         "references": titles[i:i + 3]} for i in range(8)]} for author in ("ada", "bo")]
    (folder / "questions.json").write_text(json.dumps(questions))
    (folder / "outputs.json").write_text(json.dumps({"task": "LaMP_1", "golds": [
        {"id": q["id"], "output": "[1]"} for q in questions]}))
    return load(folder)


def _ran(state: ProgramState) -> list[PersonaVersion]:
    """The versions an alignment ran, whenever and by whatever trigger they were recorded."""
    return [replace(v, created_at=0.0, trigger="") for v in state.versions]


@pytest.mark.parametrize("task,optimizer", [("LaMP-3", "persona"), ("LaMP-1", "persona"), ("LaMP-3", "gepa")])
def test_the_service_aligns_a_user_as_the_compile_does(tmp_path, embedder, task, optimizer, monkeypatch):
    # The same stages on the same replays, with the store's population model: for LaMP-1 the
    # replays are not the memory records themselves, whose outputs are reference lists.
    data = _citing_authors(tmp_path) if task == "LaMP-1" else load(SAMPLE_DIR / "LaMP-3-amazon").select(2)
    labels = data.task.labels
    answers = {**REWRITE, "new_instruction": "Answer as this user would.",
               "answer": lambda prompt: labels[-1] if REWRITE["summary"] in prompt else labels[0]}
    compile_users(data, tmp_path / "store", CompileConfig(optimizer=optimizer), progress=False,
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", lm=local_lm(FakeEngine(answers)))
    store = UserStore(tmp_path / "store", embedder)
    user_id = next(iter(data.users))
    compiled = store.load_state(user_id)
    store.program_path(user_id).unlink()  # the user as the service knows them: memory and profile
    realigned = []  # the service aligns through the pipeline's own function
    monkeypatch.setattr(pipeline, "realign", lambda *args, _run=pipeline.realign: realigned.append(args[1]) or _run(*args))
    with PersonaService(store, local_lm(FakeEngine(answers)), default_task=data.task) as service:
        job = wait_for(service.align(user_id, optimizer=optimizer))
    assert job.status == "succeeded", job.error
    assert [user.replays for user in realigned] == [data.users[user_id].replays]
    aligned = store.load_state(user_id)
    assert _ran(aligned) == _ran(compiled) and len(aligned.versions) > 1
    assert {v.trigger for v in aligned.versions} == {"align request"}
    if optimizer == "gepa":
        assert aligned.current.note == "gepa"
    else:
        assert aligned.versions[1].note.startswith("evidence weights and label offsets: the population model (fitted")
