"""Streamed chat on the real model (SmolLM2-135M through llama.cpp, in its child process) behind a
real server on 127.0.0.1: tokens reach the caller as the model generates them, a caller who
disconnects stops the generation, and a crash mid-stream fails the stream."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Iterator

import dspy
import httpx
import pytest
from dspy.lm15 import request_from_openai_chat

from personaagent.app.http import create_app, running
from personaagent.app.service import PersonaService
from personaagent.program.isolated import EngineCrashed, IsolatedEngine
from personaagent.program.store import UserStore

from test_isolation import SMALL, small_model  # noqa: F401 (a fixture)

pytestmark = pytest.mark.model
TOKEN = "stream-token"
COUNTING = "Write the numbers from 1 to 1000, separated by commas."  # the small model's reply runs on


@pytest.fixture(scope="module")
def engine(small_model):  # noqa: F811
    engine = IsolatedEngine(SMALL)
    yield engine
    engine.close()


@contextlib.contextmanager
def serving(engine: IsolatedEngine, store: UserStore, max_tokens: int) -> Iterator[str]:
    lm = dspy.LM(f"local/{SMALL}", engine=engine, cache=False, temperature=0.0, max_tokens=max_tokens)
    service = PersonaService(store, lm)
    try:
        with running(create_app(service, TOKEN)) as url:
            yield url
    finally:
        service.close()


@contextlib.contextmanager
def chat_stream(url: str, user: str) -> Iterator[Iterator[str]]:
    """The streamed reply's text pieces, as they arrive; leaving closes the connection."""
    body = {"user": user, "stream": True, "messages": [{"role": "user", "content": COUNTING}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        events = (json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: {"))
        yield (event["choices"][0]["delta"]["content"] for event in events
               if event["choices"][0]["delta"].get("content"))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # user + system time


def test_tokens_reach_the_caller_as_the_model_generates_them(engine, tmp_path, embedder):
    store = UserStore(tmp_path / "store", embedder)
    with serving(engine, store, max_tokens=200) as url:
        started = time.perf_counter()
        arrivals, pieces = [], []
        with chat_stream(url, "dana") as stream:
            for piece in stream:
                arrivals.append(time.perf_counter() - started)
                pieces.append(piece)
        remembered = store.memory("dana").all()
    assert len(pieces) > 100  # about a token each
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])
    assert [r.metadata["reply"] for r in remembered] == ["".join(pieces)]


def test_a_caller_who_disconnects_stops_the_generation(engine, tmp_path, embedder):
    """Without the cancel, the child would go on for about 20 s (1,500 tokens) after the caller left."""
    store = UserStore(tmp_path / "store", embedder)
    with serving(engine, store, max_tokens=1500) as url:
        with chat_stream(url, "erin") as stream:
            for _ in range(5):
                next(stream)
        deadline = time.monotonic() + 5
        while True:  # the child goes idle
            before = cpu_seconds(engine.pid)
            time.sleep(0.5)
            if cpu_seconds(engine.pid) - before < 0.05:
                break
            assert time.monotonic() < deadline, "the engine kept generating after its caller left"
        started = time.perf_counter()
        engine.score([{"role": "user", "content": "Rate it from 1 to 5: great."}], [" 1", " 5"])
        assert time.perf_counter() - started < 3  # the next call is served at once
        assert len(store.memory("erin")) == 0  # a reply never finished is not remembered


def test_a_crash_mid_stream_fails_the_stream_and_a_fresh_engine_serves(engine):
    request = request_from_openai_chat({"model": f"local/{SMALL}", "messages": [{"role": "user", "content": COUNTING}],
                                        "temperature": 0.0, "max_tokens": 500})
    crashes = engine.crashes
    events = engine.stream(request)
    next(events)  # generating
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(EngineCrashed, match="SIGKILL"):
        for _ in events:
            pass
    assert engine.crashes == crashes + 1
    short = request_from_openai_chat({"model": f"local/{SMALL}", "messages": [{"role": "user", "content": "Hi!"}],
                                      "temperature": 0.0, "max_tokens": 8})
    assert "".join(e.delta.text for e in engine.stream(short) if e.type == "delta")
