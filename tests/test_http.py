"""The HTTP API: a real uvicorn server on 127.0.0.1, driven with httpx; only the LM is fake."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import dspy
import httpx
import pytest

from personaagent.data.tasks import Interaction
from personaagent.app.http import create_app, running
from personaagent.program.memory import Profile
from personaagent.app.service import PersonaService
from personaagent.program.store import UserStore
from personaagent.program.testing import FakeEngine

from test_service import REWRITE, SOURCES, save_persona

TOKEN = "test-token"


@pytest.fixture(scope="module")
def engine():
    return FakeEngine({"answer": "4", **REWRITE})


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedder, engine):
    """Alice and Bob, each with a compiled persona and memories that only they may ever see."""
    store = UserStore(tmp_path_factory.mktemp("http") / "store", embedder)
    store.memory("alice").add([Interaction("review: ALICE-SECRET guitar strings that sing", "5", 1.0),
                               Interaction("review: a guitar strap, fine", "4", 2.0)])
    store.save_profile("alice", Profile("Alice loves ALICE-PERSONA vintage guitars.", [], 2))
    save_persona(store, "alice", "Alice loves ALICE-PERSONA vintage guitars.")
    store.memory("bob").add([Interaction("review: BOB-SECRET lipstick that smudges", "1", 1.0)])
    store.save_profile("bob", Profile("Bob buys BOB-PROFILE makeup.", [], 1))
    save_persona(store, "bob", "Bob is hard to please about BOB-PERSONA makeup.")
    service = PersonaService(store, dspy.LM("local/fake", engine=engine, cache=False))
    with running(create_app(service, TOKEN, max_body_bytes=32 * 1024)) as url:
        yield url, store
    service.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, message: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and message in body["message"]


def test_health_and_openapi_need_no_token(server):
    assert httpx.get(server[0] + "/healthz").json()["status"] == "ok"
    paths = httpx.get(server[0] + "/openapi.json").json()["paths"]
    for path in ("/v1/users/{user_id}/answer", "/v1/users/{user_id}/interactions", "/v1/users/{user_id}/persona",
                 "/v1/users/{user_id}/align", "/v1/users/{user_id}/align/{job_id}", "/v1/users/{user_id}", "/healthz"):
        assert path in paths


@pytest.mark.parametrize("headers, message", [({}, "missing bearer token"),
                                              ({"Authorization": "Bearer wrong"}, "wrong bearer token"),
                                              ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token")])
def test_a_missing_or_wrong_token_is_refused(server, headers, message):
    for method, path, body in (("POST", "/v1/users/alice/answer", {"text": "hi"}), ("GET", "/v1/users/alice/persona", None),
                               ("DELETE", "/v1/users/alice", None)):
        response = httpx.request(method, server[0] + path, json=body, headers=headers)
        assert_error(response, 401, message)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert server[1].user_dir("alice").exists()


def test_answer(client):
    response = client.post("/v1/users/alice/answer", json={"text": "review: warm-sounding strings"})
    assert response.status_code == 200
    body = response.json()
    assert {k: body.pop(k) for k in ("user_id", "answer", "persona_version", "tools")} == {
        "user_id": "alice", "answer": "4", "persona_version": 1, "tools": SOURCES}
    # A rating is answered from label likelihoods: every label's probability comes with it.
    assert set(body) == {"label_scores", "confidence", "scoring"} and body["scoring"] == "likelihood"
    assert set(body["label_scores"]) == {"1", "2", "3", "4", "5"} and sum(body["label_scores"].values()) == pytest.approx(1)
    assert body["confidence"] == body["label_scores"]["4"] == max(body["label_scores"].values())
    assert_error(client.post("/v1/users/nobody/answer", json={"text": "hi"}), 404, "unknown user 'nobody'")


@pytest.mark.parametrize("path, status", [("/v1/users/bad$id/persona", 400), ("/v1/users/%2E%2E/persona", 400),
                                          ("/v1/users/..%2F..%2Fetc/persona", 404), ("/v1/users/a%2Fb/persona", 404),
                                          (f"/v1/users/{'x' * 200}/persona", 400), ("/v1/users/%20x/persona", 400),
                                          (f"/v1/users/{'%C3%A9' * 128}/persona", 400), ("/v1/users/a%20/persona", 400)])
def test_bad_user_ids_are_refused_and_touch_nothing(client, server, path, status):
    root = server[1].root.parent
    before = sorted(map(str, root.rglob("*")))
    for response in (client.get(path), client.post(path.replace("persona", "interactions"), json={"input": "x"}),
                     client.delete(path.removesuffix("/persona"))):
        assert_error(response, status)
    assert sorted(map(str, root.rglob("*"))) == before


def test_oversized_and_malformed_bodies_are_refused(client):
    assert_error(client.post("/v1/users/alice/interactions", json={"input": "x" * 40_000}), 413, "over the limit of 32768 bytes")
    chunked = (b'{"input": "' + b"x" * 1024 for _ in range(40))  # no Content-Length: counted while read
    assert_error(client.post("/v1/users/alice/interactions", content=chunked, headers={"Content-Type": "application/json"}),
                 413, "over the limit")
    assert_error(client.post("/v1/users/alice/answer", json={"text": "x" * 20_000}), 422, "body.text")
    assert_error(client.post("/v1/users/alice/answer", content=b"{not json", headers={"Content-Type": "application/json"}), 422)
    assert_error(client.post("/v1/users/alice/answer", json={}), 422, "body.text: Field required")


def test_concurrent_appends_are_all_recorded(client):
    before = client.get("/v1/users/bob/persona").json()["interactions"]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: client.post("/v1/users/bob/interactions",
                                                        json={"input": f"review: lipstick number {i}", "output": "2"}),
                                  range(60)))
    assert [r.status_code for r in responses] == [201] * 60
    assert len({r.json()["ids"][0] for r in responses}) == 60
    assert client.get("/v1/users/bob/persona").json()["interactions"] == before + 60
    duplicate = {"input": "review: same again", "output": "3", "timestamp": 5.0}
    assert client.post("/v1/users/bob/interactions", json=duplicate).status_code == 201
    repeated = client.post("/v1/users/bob/interactions", json=duplicate)
    assert repeated.status_code == 200 and repeated.json() == {"user_id": "bob", "added": False, "ids": []}


def test_one_user_never_sees_another_users_memory_or_persona(client, engine):
    # The persona searches memory with the question: "smudges" is in one of Bob's records only, so
    # full-text search ranks his secret first however many other lipstick records the tests add
    # (embedding ranks among near-duplicates vary by CPU).
    start = len(engine.requests)
    assert client.post("/v1/users/bob/answer", json={"text": "review: guitar strings and lipstick that smudges"}).status_code == 200
    bob_prompts = "\n".join(engine.requests[start:])
    # The tools did read Bob's memory and profile.
    assert "BOB-SECRET" in bob_prompts and "BOB-PROFILE" in bob_prompts and "BOB-PERSONA" in bob_prompts
    assert "ALICE" not in bob_prompts
    assert "ALICE" not in client.get("/v1/users/bob/persona").text

    start = len(engine.requests)
    assert client.post("/v1/users/alice/answer", json={"text": "review: guitar strings and lipstick that smudges"}).status_code == 200
    alice_prompts = "\n".join(engine.requests[start:])
    assert "ALICE-SECRET" in alice_prompts and "BOB" not in alice_prompts


def test_an_lm_failure_is_503_with_a_retry_hint_and_the_server_goes_on(client, engine):
    engine.fail = True
    try:
        response = client.post("/v1/users/alice/answer", json={"text": "review: fine"})
    finally:
        engine.fail = False
    assert_error(response, 503, "the language model failed")
    assert int(response.headers["Retry-After"]) > 0
    assert client.post("/v1/users/alice/answer", json={"text": "review: fine"}).status_code == 200


def test_a_broken_program_file_is_a_json_500_for_that_user_only(client, server):
    store = server[1]
    store.memory("dora").add([Interaction("review: fine", "4")])
    store.program_path("dora").write_text("{ truncated")
    assert_error(client.post("/v1/users/dora/answer", json={"text": "review: ok"}), 500, "internal error (JSONDecodeError)")
    assert client.post("/v1/users/alice/answer", json={"text": "review: ok"}).status_code == 200


def test_align_in_the_background_then_read_the_new_persona_version(client):
    assert_error(client.post("/v1/users/alice/align", json={"n_recent": 0}), 422, "body.n_recent")
    assert_error(client.post("/v1/users/alice/align", json={"acceptance": "guarded"}), 422, "body.acceptance")
    # Both of Alice's interactions are replayed, so none is left to validate on: the paper's setting
    # ("always") takes the rewrite unscored. The evidence weights are fitted first (version 2).
    response = client.post("/v1/users/alice/align", json={"n_recent": 2, "acceptance": "always"})
    assert response.status_code == 202
    job = response.json()
    deadline = time.time() + 60
    while job["status"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.05)
        job = client.get(f"/v1/users/alice/align/{job['id']}").json()
    assert (job["status"], job["new_versions"], job["current_version"]) == ("succeeded", [2, 3], 3)
    assert_error(client.get(f"/v1/users/bob/align/{job['id']}"), 404)  # another user's job is not theirs to read

    persona = client.get("/v1/users/alice/persona").json()
    assert persona["compiled"] and persona["current_version"] == 3
    assert [v["version"] for v in persona["versions"]] == [1, 2, 3]
    assert persona["versions"][1]["note"].startswith("evidence weights and label offsets")
    assert persona["persona"]["summary"] == REWRITE["summary"] == persona["versions"][2]["persona"]["summary"]
    assert persona["versions"][2]["score"] is None  # not validated
    assert client.post("/v1/users/alice/answer", json={"text": "review: fine"}).json()["persona_version"] == 3


def test_delete_forgets_the_user_completely(client, server):
    assert client.post("/v1/users/carol/interactions", json={"input": "review: CAROL-SECRET", "output": "5"}).status_code == 201
    directory = server[1].user_dir("carol")
    assert directory.exists()
    assert client.delete("/v1/users/carol").json() == {"user_id": "carol", "deleted": True}
    assert not directory.exists()
    assert_error(client.get("/v1/users/carol/persona"), 404)
    assert_error(client.post("/v1/users/carol/answer", json={"text": "hi"}), 404)
    assert_error(client.delete("/v1/users/carol"), 404)
    assert client.post("/v1/users/carol/interactions", json={"input": "review: hello", "output": "4"}).status_code == 201
    assert client.get("/v1/users/carol/persona").json()["interactions"] == 1  # a new user, nothing of the old one


def test_the_serve_command(tmp_path):
    env = {**os.environ, "PERSONAAGENT_TOKEN": TOKEN}
    missing = subprocess.run([sys.executable, "-m", "personaagent.app.cli", "serve", "--store", str(tmp_path)],
                             env={k: v for k, v in env.items() if k != "PERSONAAGENT_TOKEN"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "PERSONAAGENT_TOKEN" in missing.stderr
    with serve_command(["--store", str(tmp_path), "--lm", "openai/unused", "--api-base", "http://127.0.0.1:9"], env) as url:
        assert httpx.get(url + "/healthz").json()["lm"] == "openai/unused"
        assert_error(httpx.get(url + "/v1/users/alice/persona"), 401)
        assert_error(httpx.get(url + "/v1/users/alice/persona", headers={"Authorization": f"Bearer {TOKEN}"}), 404)


@contextlib.contextmanager
def serve_command(args: list[str], env: dict) -> Iterator[str]:
    """`personaagent serve ARGS` in a subprocess on a free port; yields its URL once /healthz answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "personaagent.app.cli", "serve", *args, "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None and time.time() < deadline, f"the server did not start:\n{process.stdout.read()}"
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)
