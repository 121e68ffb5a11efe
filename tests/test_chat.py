"""The OpenAI-compatible chat endpoint, through the real `openai` client against a real server; only
the LM is fake (its reply shows what the prompt held, so isolation is visible)."""

from __future__ import annotations

import dspy
import openai
import pytest

from personaagent.app.http import create_app, running
from personaagent.app.service import PersonaService
from personaagent.data.tasks import Interaction
from personaagent.program.store import UserStore
from personaagent.program.testing import FakeEngine, fake_lm

from test_service import save_persona

TOKEN = "chat-token"


def _reply(prompt: str) -> str:
    """Says which users' secrets and personas the prompt carried."""
    seen = [word for word in ("ALICE-SECRET", "ALICE-PERSONA", "BOB-SECRET", "BOB-PERSONA") if word in prompt]
    return "I saw: " + (", ".join(seen) or "nothing")


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedder):
    store = UserStore(tmp_path_factory.mktemp("chat") / "store", embedder)
    store.memory("alice").add([Interaction("ALICE-SECRET: which strings suit a jazz guitar?", "flatwounds", 1.0)])
    save_persona(store, "alice", "Alice plays ALICE-PERSONA jazz.")
    store.memory("bob").add([Interaction("BOB-SECRET: a lipstick that lasts?", "matte", 1.0)])
    save_persona(store, "bob", "Bob wants BOB-PERSONA makeup.")
    engine = FakeEngine({"reply": _reply})
    service = PersonaService(store, dspy.LM("local/fake", engine=engine, cache=False))
    with running(create_app(service, TOKEN)) as url:
        yield url, store, engine
    service.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=TOKEN, max_retries=0)


def test_each_user_gets_their_own_persona_and_memory_and_the_turn_is_remembered(client, server):
    store = server[1]
    before = len(store.memory("alice"))
    alice = client.chat.completions.create(model="persona", user="alice",
                                           messages=[{"role": "user", "content": "Which strings for jazz?"}])
    assert alice.choices[0].message.content == "I saw: ALICE-SECRET, ALICE-PERSONA"
    assert alice.choices[0].finish_reason == "stop" and alice.object == "chat.completion"
    bob = client.chat.completions.create(model="persona", messages=[{"role": "user", "content": "A lipstick that lasts?"}],
                                         extra_headers={"X-PersonaAgent-User": "bob"})
    assert bob.choices[0].message.content == "I saw: BOB-SECRET, BOB-PERSONA"
    remembered = store.memory("alice").all()[-1]
    assert len(store.memory("alice")) == before + 1 and remembered.input == "Which strings for jazz?"
    assert remembered.metadata["reply"] == "I saw: ALICE-SECRET, ALICE-PERSONA"


def test_streaming_sends_the_reply_in_chunks_then_stops(client):
    stream = client.chat.completions.create(model="persona", user="bob", stream=True,
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "A lipstick?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "I saw: BOB-SECRET, BOB-PERSONA" and len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"


def test_errors_keep_the_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as missing_user:
        client.chat.completions.create(model="persona", messages=[{"role": "user", "content": "hi"}])
    assert missing_user.value.body["type"] == "invalid_request_error" and "name the user" in missing_user.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="invalid user id"):
        client.chat.completions.create(model="persona", user="../alice", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError) as wrong_token:
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="persona", user="alice", messages=[{"role": "user", "content": "hi"}])
    assert wrong_token.value.body["type"] == "authentication_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="persona", user="alice", messages=[])


def test_a_new_user_is_created_by_their_first_turn(client, server):
    reply = client.chat.completions.create(model="persona", user="carol", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "I saw: nothing"  # nobody else's memory or persona
    assert [r.input for r in server[1].memory("carol").all()] == ["hello"]


def test_a_served_lm_streams_its_reply_and_the_turn_is_remembered(server, tmp_path, embedder):
    """The LM is a server (this endpoint itself, answering as Bob), reached through LiteLLM's stream."""
    lm = dspy.LM("openai/persona", api_base=server[0] + "/v1", api_key=TOKEN, cache=False,
                 extra_headers={"X-PersonaAgent-User": "bob"})
    service = PersonaService(UserStore(tmp_path / "store", embedder), lm)
    try:
        pieces = list(service.stream_chat("erin", [{"role": "user", "content": "A lipstick?"}]))
        assert "".join(pieces) == "I saw: BOB-SECRET, BOB-PERSONA" and len(pieces) == 4
        assert [r.metadata["reply"] for r in service.store.memory("erin").all()] == ["I saw: BOB-SECRET, BOB-PERSONA"]
    finally:
        service.close()


def test_a_stream_whose_lm_fails_before_its_first_token_is_a_503(tmp_path, embedder):
    service = PersonaService(UserStore(tmp_path / "store", embedder), fake_lm(fail=True), lm_retry_after=2)
    try:
        with running(create_app(service, TOKEN)) as url, pytest.raises(openai.InternalServerError) as failed:
            openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0).chat.completions.create(
                model="persona", user="erin", stream=True, messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 503 and failed.value.response.headers["Retry-After"] == "2"
        assert "fake LM is unreachable" in failed.value.body["message"]
    finally:
        service.close()


def test_each_turn_extends_the_last_so_the_engine_can_resume_from_it(tmp_path, embedder):
    """A follow-up's prompt is the previous turn's prompt and reply plus the new message: the past
    interactions shown are those most like the opening message, as memory was when the conversation
    began; its own turns (remembered after each) are not shown as its past. A second conversation
    that opens the same way (and gets the same reply) is shown the first one as its past."""
    store = UserStore(tmp_path / "store", embedder)
    store.memory("dana").add([Interaction(f"{topic}: which one?", "the first", float(i)) for i, topic in enumerate(
        ["jazz guitar strings", "a pick for jazz", "lipstick shades", "hiking boots", "tea kettles", "jazz amps"])])
    engine = FakeEngine({"reply": "Flatwounds."})
    service = PersonaService(store, dspy.LM("local/fake", engine=engine, cache=False))
    try:
        for _ in range(2):
            conversation = [{"role": "user", "content": "Which strings for jazz guitar?"}]
            prompts = []
            for follow_up in ("Why?", "And for hiking boots?"):
                conversation.append({"role": "assistant", "content": "".join(service.stream_chat("dana", conversation))})
                prompts.append(engine.requests[-1])
                conversation.append({"role": "user", "content": follow_up})
            "".join(service.stream_chat("dana", conversation))
            prompts.append(engine.requests[-1])
            assert "jazz guitar strings" in prompts[0] and "hiking boots: which one" not in prompts[0]
            for before, after in zip(prompts, prompts[1:]):
                assert after.startswith(before + "\nFlatwounds.\n")
        assert "- Which strings for jazz guitar?" in prompts[0]  # the first conversation, as the second's past
        service.delete("dana")  # what the service kept of her conversations goes with her
        assert not any(key[0] == "dana" for key in service._pasts._pasts)
    finally:
        service.close()
