"""A native crash of the embedded engine, on the real model (SmolLM2-135M through llama.cpp): the
self-test reports it as one line, a server answers 503 and then serves again, a compile goes on
with the other users. The crash is a real abort of the engine's child process, asked for with
`ABORT_ON_ENV` (read by each child when it starts)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import dspy
import httpx
import pytest

from personaagent.data import SAMPLE_DIR
from personaagent.data.loaders import load
from personaagent.data.tasks import Interaction, LAMP_TASKS
from personaagent.app.http import create_app, running
from personaagent.app.service import PersonaService
from personaagent.optimizers.compile import compile_users
from personaagent.optimizers.pipeline import CompileConfig
from personaagent.program import models
from personaagent.program.isolated import ABORT_ON_ENV, SELF_TEST_PROMPT, IsolatedEngine
from personaagent.program.native_build import cpu_flags, enabled_options
from personaagent.program.store import UserStore

pytestmark = pytest.mark.model
SMALL = "smollm2-135m"
CLI = [sys.executable, "-m", "personaagent.app.cli"]
MARKER = "CRASH-THE-ENGINE"


@pytest.fixture(scope="module")
def small_model():
    return models.prepare(SMALL, progress=False)


def small_lm(engine: IsolatedEngine) -> dspy.LM:
    return dspy.LM(f"local/{SMALL}", engine=engine, cache=False, temperature=0.0, max_tokens=64)


def test_models_prepare_reports_a_crashing_engine_in_one_line(small_model):
    ok = subprocess.run(CLI + ["models", "prepare", SMALL], capture_output=True, text=True)
    assert ok.returncode == 0 and "self-test passed" in ok.stdout, ok.stderr
    crash = subprocess.run(CLI + ["models", "prepare", SMALL], capture_output=True, text=True,
                           env={**os.environ, ABORT_ON_ENV: SELF_TEST_PROMPT})
    assert crash.returncode == 2
    # One line (beside the checksum's progress bar), and no Python fault dump or traceback.
    assert "Fatal Python error" not in crash.stderr and "Traceback" not in crash.stderr
    errors = [line for line in crash.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and crash.stderr.rstrip().endswith(errors[0]), crash.stderr
    assert "crashed in its self-test (SIGABRT" in errors[0] and "CPU flags:" in errors[0]
    assert "llama.cpp build:" in errors[0] and "make engine" in errors[0]


def test_models_lists_the_instruction_sets_the_engine_uses(small_model):
    out = subprocess.run(CLI + ["models"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("engine:"))
    assert "AMX" not in line.replace("AMX_INT8 = 0", "")  # never compiled in
    for option in enabled_options(cpu_flags()):  # what this CPU has is what the build uses
        if option in ("AVX2", "AVX512"):
            assert f"{option} " in line + " "


def test_a_crash_during_an_answer_gives_503_then_the_server_serves_again(small_model, tmp_path, embedder, monkeypatch):
    monkeypatch.setenv(ABORT_ON_ENV, MARKER)
    engine = IsolatedEngine(SMALL)
    store = UserStore(tmp_path / "store", embedder)
    store.memory("carol").add([Interaction("review: good strings", "5", 1.0)])
    service = PersonaService(store, small_lm(engine), default_task=LAMP_TASKS["LaMP-3"], lm_retry_after=2)
    question = "What is the score of the following review on a scale of 1 to 5? review: {}"
    try:
        with running(create_app(service, "t")) as url, httpx.Client(
                base_url=url, headers={"Authorization": "Bearer t"}, timeout=120) as client:
            crashed = client.post("/v1/users/carol/answer", json={"text": question.format(f"{MARKER} strings")})
            assert crashed.status_code == 503 and int(crashed.headers["Retry-After"]) > 0
            assert "crashed" in crashed.json()["message"]
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json()["engine"] in ("restarting", "ready")
            assert client.get("/v1/users/carol/persona").status_code == 200  # the rest of the API answers
            deadline = time.time() + 120
            while client.get("/healthz").json()["engine"] != "ready":
                assert time.time() < deadline, "the engine did not restart"
                time.sleep(0.2)
            answered = client.post("/v1/users/carol/answer", json={"text": question.format("great strings")})
            assert answered.status_code == 200 and answered.json()["answer"] in "12345"
        assert engine.crashes == 1
    finally:
        service.close()
        engine.close()


def test_a_compile_whose_engine_crashes_on_one_user_finishes_the_others(small_model, tmp_path, monkeypatch):
    data = load(SAMPLE_DIR / "LaMP-3-amazon")
    first, second = list(data.users)[:2]
    store = tmp_path / "store"
    config = CompileConfig(lm=f"local/{SMALL}", validation=0, n_recent=1, max_lm_calls=3)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    healthy = IsolatedEngine(SMALL)
    try:
        assert compile_users(data.select(user_ids=[first]), store, config, lm=small_lm(healthy), tracking_uri=uri,
                             progress=False).counts["compiled"] == 1
    finally:
        healthy.close()
    before = UserStore(store).load_state(first)

    monkeypatch.setenv(ABORT_ON_ENV, MARKER)
    crashing = IsolatedEngine(SMALL)
    changed = data.select(user_ids=[first, second])
    user = changed.users[first]
    changed.users[first] = dataclasses.replace(user, memories=[*user.memories, Interaction(f"review: {MARKER}", "1", 9e12)])
    try:
        report = compile_users(changed, store, config, lm=small_lm(crashing), tracking_uri=uri, progress=False)
    finally:
        crashing.close()
    results = {r.user_id: r for r in report.results}
    assert results[first].status == "failed" and "crashed" in results[first].error
    assert results[second].status == "compiled"  # on the engine restarted after the crash
    after = UserStore(store).load_state(first)
    assert after.current.version == before.current.version and after.updated_at == before.updated_at



def test_a_killed_parent_does_not_leave_its_engine_running():
    """A parent killed mid-request (an eval stopped with kill) takes its engine's child with it,
    instead of leaving it to finish the request on a core nobody uses. The request is a prompt of
    about 1,500 tokens on the default model and one thread: tens of seconds."""
    script = ("from personaagent.program.isolated import IsolatedEngine\n"
              f"engine = IsolatedEngine({models.DEFAULT_MODEL!r})\nprint(engine.pid, flush=True)\n"
              "engine.score([{'role': 'user', 'content': 'one word ' * 750}], [' a', ' b'])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PERSONAAGENT_THREADS": "1"})
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the long request is running in the child
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")  # a zombie has exited
