import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from personaagent.data.tasks import LAMP_TASKS, Interaction, task_to_dict
from personaagent.program.storage import validate_user_id
from personaagent.program.persona import Persona, PersonaVersion
from personaagent.program.store import ProgramState, UserStore

TASK = LAMP_TASKS["LaMP-3"]


def _state(user_id: str, summary: str = "Rates gear generously.", number: int = 1, padding: int = 0) -> ProgramState:
    persona = Persona(summary, ["likes Fender"], ["answer with a digit"], sources=["answer_habits"], k=2,
                      demos=[{"question": "review: a capo", "answer": "4"}], weights={"lm": 0.5, "answer_habits": 1.0})
    instructions = {"answer": persona.render() + "x" * padding}
    return ProgramState(user_id, task_to_dict(TASK), "local/smollm2-135m",
                        [PersonaVersion(number, persona, instructions, 0.5, likelihood=-1.25)])


def test_save_and_load_round_trip(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.save_state(_state("alice"))
    assert store.users() == ["alice"]
    state = store.load_state("alice")
    assert state.current.version == 1 and state.current.persona.summary == "Rates gear generously."
    assert state.current.likelihood == -1.25
    program = store.load_program("alice")
    assert program.instructions == state.current.instructions["answer"]
    # The compiled choices come back with the text: what the answer call is shown and how evidence weighs.
    assert program.persona == _state("alice").current.persona and program.k == 2
    assert [d.question for d in program.answer.demos] == ["review: a capo"]
    with pytest.raises(KeyError, match="no compiled program for user 'carol'"):
        store.load_program("carol")


def test_rejected_versions_are_kept_but_not_used(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    state = _state("alice")
    bad = Persona("Copied text.", [], [])
    state.versions.append(PersonaVersion(2, bad, {"answer": bad.render()}, None, "fb", False, "copied"))
    store.save_state(state)
    loaded = store.load_state("alice")
    assert len(loaded.versions) == 2 and loaded.current.version == 1


def test_a_program_saved_before_the_compiled_choices_existed_still_loads(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.save_state(_state("alice"))
    path = store.program_path("alice")
    payload = json.loads(path.read_text())
    for version in payload["versions"]:
        del version["likelihood"]
        for name in ("sources", "k", "demos", "weights"):
            del version["persona"][name]
    path.write_text(json.dumps(payload))
    state = store.load_state("alice")
    assert state.current.likelihood is None
    persona = state.current.persona
    assert (persona.sources, persona.demos, persona.weights) == ([], [], {})
    assert store.load_program("alice").persona.summary == "Rates gear generously."


def test_a_newer_format_is_refused_not_misread(tmp_path, embedder):
    store = UserStore(tmp_path, embedder)
    store.save_state(_state("alice"))
    path = store.program_path("alice")
    payload = json.loads(path.read_text())
    payload["format_version"] = 99
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="program format version 99"):
        store.load_state("alice")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "a\nb", "..", "a..b",
                                 "é" * 65, "a ", " a", "a  b", "a:", "e\u0301"])
def test_path_tricks_in_user_ids_are_refused(bad):
    with pytest.raises(ValueError, match="invalid user id"):
        validate_user_id(bad)


def test_real_ids_are_accepted():
    for good in ["Tsujii, Jun'ichi", "A15TYOEWBQYF0X", "Mary Papenfuss", "José García", "user@example.com",
                 "Manning, Christopher D.", "é" * 64]:
        assert validate_user_id(good) == good


def test_delete_user_forgets_everything(tmp_path, embedder):
    from personaagent.data.tasks import Interaction

    store = UserStore(tmp_path, embedder)
    store.memory("alice").add([Interaction("a review", "5")])
    store.save_state(_state("alice"))
    store.memory("bob").add([Interaction("bob's review", "1")])
    assert store.delete_user("alice")
    assert not (tmp_path / "users" / "alice").exists() and store.users() == []
    assert len(store.memory("alice")) == 0 and len(store.memory("bob")) == 1


def test_killing_the_process_while_saving_leaves_the_previous_version_loadable(tmp_path):
    """A writer saves ever newer (large) versions in a loop; we kill it at arbitrary moments."""
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_store import _state
        from personaagent.program.store import UserStore
        store = UserStore({str(tmp_path)!r}, embedder=object())
        previous = store.load_state("alice")
        n = previous.current.version + 1 if previous else 1
        store.save_state(_state("alice", f"Version {{n}}.", n))
        print("ready", flush=True)
        while True:
            n += 1
            store.save_state(_state("alice", f"Version {{n}}.", n, padding=2_000_000))
    """)
    store = UserStore(tmp_path, embedder=object())
    versions = []
    for delay in (0.05, 0.2, 0.35, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = store.load_state("alice")  # never a torn or half-written file
        versions.append(state.current.version)
    assert versions == sorted(versions) and versions[-1] > versions[0]


def _open_logs(root) -> set[str]:
    """Users whose memory database this process has open."""
    users = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(root)) and target.endswith("episodic.sqlite"):
            users.add(os.path.basename(os.path.dirname(target)))
    return users


def test_only_recent_or_held_memories_stay_open(tmp_path, embedder):
    store = UserStore(tmp_path, embedder, max_open=2)
    held = store.memory("u0")  # as a loaded program holds its user's memory
    for i in range(5):
        store.memory(f"u{i}").add([Interaction(f"a review by u{i}", "5", 1.0)])
    assert _open_logs(tmp_path) == {"u0", "u3", "u4"}
    assert store.memory("u0") is held  # one handle per user, never a second connection
    # Closed memories wrote their index: they reopen without a rebuild, with every record.
    assert (store.user_dir("u1") / "episodic.faiss").exists()
    assert [r.input for r in store.memory("u1").search("review", 4)] == ["a review by u1"]
    assert store.delete_user("u1") and not store.user_dir("u1").exists()
    store.close()
    assert _open_logs(tmp_path) == set()


def _history(user_id: str, scores: list[float | None]) -> ProgramState:
    """Version 1, then one version per score (None: a rejected rewrite)."""
    state = _state(user_id)
    for score in scores:
        persona = Persona(f"Version {state.next_version} of the user.", [], [])
        state.versions.append(PersonaVersion(state.next_version, persona, {"answer": persona.render()},
                                             score, accepted=score is not None))
    return state


def test_history_is_bounded_keeping_the_initial_best_current_and_latest_versions(tmp_path, embedder):
    store = UserStore(tmp_path, embedder, max_versions=4)
    store.save_state(_history("alice", [0.6, 0.9, 0.7, 0.8, None, None]))  # v2..v7; v3 best, v5 current
    state = store.load_state("alice")
    assert [v.version for v in state.versions] == [1, 3, 5, 7]
    assert state.current.version == 5 and state.next_version == 8  # numbers are never reused
    for _ in range(30):  # many alignments later, the file stays bounded
        state.versions.append(PersonaVersion(state.next_version, state.versions[-1].persona, {"answer": "a"}, 0.1))
        store.save_state(state)
    assert len(store.load_state("alice").versions) == 4 and store.load_state("alice").versions[0].version == 1


def test_rollback_makes_a_kept_version_current_again_as_a_new_version(tmp_path, embedder):
    store = UserStore(tmp_path, embedder, max_versions=4)
    store.save_state(_history("alice", [0.6, 0.9, 0.7, 0.8, None, None]))
    state = store.rollback("alice", 3)
    assert state.current.version == 8 and state.current.note == "rollback to v3"
    assert state.current.persona == state.versions[1].persona and store.load_state("alice").current.version == 8
    assert store.load_program("alice").instructions == "Answer the question. Use the tool results as evidence when they help.\n" \
                                                     "About this user: Version 3 of the user."
    with pytest.raises(KeyError, match=r"version 2 of user 'alice' is not kept \(kept: 1, 3, 7, 8\)"):
        store.rollback("alice", 2)
