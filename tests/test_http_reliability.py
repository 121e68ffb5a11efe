"""The HTTP service under a demanding operator: fuzzed requests, an unwritable store, callers that
give up, SIGTERM under load. Real uvicorn servers on 127.0.0.1; only the LM is fake."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings

from personaagent.app.http import create_app, running
from personaagent.app.service import PersonaService
from personaagent.program.store import UserStore

from test_service import ALICE, GatedEngine, save_persona

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _store(root: Path, embedder) -> UserStore:
    store = UserStore(root, embedder)
    store.memory("alice").add(ALICE)
    save_persona(store, "alice", "Alice is a moody reviewer.")
    return store


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, embedder):
    engine = GatedEngine({"answer": "4"})
    service = PersonaService(_store(tmp_path_factory.mktemp("fuzz"), embedder), dspy.LM("local/fake", engine=engine, cache=False))
    with running(create_app(service, TOKEN)) as url:
        yield url
    service.close()


FUZZED_PER_OPERATION = 25  # a bounded run: a few hundred requests in all


def test_fuzzed_requests_get_only_documented_statuses_and_no_server_error(fuzzed):
    """Schemathesis against the real server: every response's status is in the OpenAPI description,
    its body matches it, and none is a 5xx."""
    schema = schemathesis.openapi.from_url(f"{fuzzed}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZED_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Ids that fit the documented pattern but break a rule it cannot state ("a..b") get a
            # 400 by design: "schema-valid data rejected" is not a failure here; everything else is.
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        check()


def test_every_route_documents_the_errors_it_returns_and_docs_need_no_cdn(fuzzed):
    paths = httpx.get(f"{fuzzed}/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            if path.startswith("/v1"):
                assert {"400", "401", "404", "413", "422", "500", "503"} <= statuses, (method, path)
            else:
                assert {"200", "503"} <= statuses
    assert "409" in paths["/v1/users/{user_id}/align"]["post"]["responses"]
    assert {"200", "201"} <= set(paths["/v1/users/{user_id}/interactions"]["post"]["responses"])
    assert httpx.get(f"{fuzzed}/docs").status_code == 404  # off by default: its script is on a CDN


def test_an_unwritable_store_is_not_ready_and_users_get_503_saying_why(tmp_path, embedder):
    store = _store(tmp_path / "store", embedder)
    service = PersonaService(store, dspy.LM("local/fake", engine=GatedEngine({"answer": "4"}), cache=False))
    users = store.root / "users"
    with running(create_app(service, TOKEN)) as url, httpx.Client(base_url=url, headers=AUTH) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        users.rename(store.root / "users.moved")
        users.write_text("a file where the users' folder was: nothing can be written")
        time.sleep(1.1)  # readiness is checked at most once a second
        health = client.get("/healthz")
        assert health.status_code == 503 and "not writable" in health.json()["reason"]
        for response in (client.get("/v1/users/alice/persona"), client.post("/v1/users/alice/answer", json={"text": "hi"}),
                         client.post("/v1/users/carol/interactions", json={"input": "hi"})):
            assert response.status_code == 503 and "is not writable" in response.json()["message"]
            assert response.headers["Retry-After"]
        users.unlink()
        (store.root / "users.moved").rename(users)
        time.sleep(1.1)
        assert client.get("/healthz").status_code == 200 and client.get("/v1/users/alice/persona").status_code == 200
    service.close()


def test_answers_whose_callers_gave_up_are_dropped_before_the_lm(tmp_path, embedder):
    engine = GatedEngine({"answer": "4"})
    service = PersonaService(_store(tmp_path / "store", embedder), dspy.LM("local/fake", engine=engine, cache=False))
    with running(create_app(service, TOKEN)) as url:
        engine.gate.clear()

        def impatient(i):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/v1/users/alice/answer", json={"text": f"review: impatient {i}"}, headers=AUTH, timeout=1.0)

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(impatient, range(20)))
        time.sleep(0.5)  # the server notices the disconnections
        engine.gate.set()
        deadline = time.monotonic() + 10
        while service.queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.queued == 0
        reached = [r for r in engine.requests if "impatient" in r]
        assert len(reached) <= 1  # at most the one already at the LM when its caller left
        fresh = httpx.post(f"{url}/v1/users/alice/answer", json={"text": "review: patient"}, headers=AUTH, timeout=30)
        assert fresh.status_code == 200 and fresh.json()["answer"] == "4"
    service.close()


SERVER = textwrap.dedent("""
    import time
    import dspy
    from personaagent.program.testing import FakeEngine
    from personaagent.app.http import serve

    class Slow(FakeEngine):
        def score(self, messages, continuations):
            time.sleep(0.5)
            return super().score(messages, continuations)

    serve({store!r}, token="t", port={port}, lm=dspy.LM("local/fake", engine=Slow({{"answer": "4"}}), cache=False))
""")


def test_sigterm_under_load_stops_the_server_within_ten_seconds(tmp_path, embedder):
    store = _store(tmp_path / "store", embedder)
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(store=str(store.root), port=port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PERSONAAGENT_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        load = ThreadPoolExecutor(30)
        for i in range(30):
            load.submit(_post_quietly, url, i)
        time.sleep(1.5)  # answers queued behind a slow LM
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        assert time.monotonic() - started < 10
    finally:
        server.kill()
        load.shutdown(wait=False, cancel_futures=True)


def _post_quietly(url: str, i: int) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/v1/users/alice/answer", json={"text": f"review: {i}"}, headers={"Authorization": "Bearer t"},
                   timeout=60)
