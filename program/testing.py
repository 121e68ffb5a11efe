"""A fake LM for tests, benchmarks and examples: DSPy's real adapters and modules run, only the
model's replies are made up. The embedded engine's interface (`complete`, `score`, `stream`), so
every code path that answers from label likelihoods runs on it too.

    lm = fake_lm({"answer": "4"})           # every answer field says "4"
    lm = fake_lm({"answer": lambda prompt: "5" if "great" in prompt else "2"})
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import dspy
from dspy.lm15 import Message, Response, StreamDeltaEvent, TextPart, Usage, response_to_events


class FakeEngine:
    """A DSPy engine that answers every request with JSON for the requested output fields.

    `answers` maps an output field name to a value, or to a callable(prompt_text) -> value;
    other fields get a value of their schema type (an enum's first choice, "text", [], 0). A request
    without an output schema (a plain chat turn) gets the `reply` entry as its text.
    `fail` makes every call raise, as an unreachable LM would.
    """

    supports_response_schema = True
    supported_params = frozenset({"temperature", "max_tokens", "response_format"})

    def __init__(self, answers: dict | None = None, fail: bool = False):
        self.answers = answers or {}
        self.fail = fail
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def _value(self, name: str, schema: dict, prompt: str):
        if name in self.answers:
            value = self.answers[name]
            return value(prompt) if callable(value) else value
        if "enum" in schema:
            return schema["enum"][0]
        if "anyOf" in schema:
            return self._value(name, schema["anyOf"][0], prompt)
        return {"string": "text", "array": [], "integer": 0, "number": 0.0,
                "boolean": False}.get(schema.get("type"), "text")

    def complete(self, request):
        prompt = "\n".join([request.system if isinstance(request.system, str) else ""]
                           + [m.text or "" for m in request.messages])
        with self._lock:
            self.requests.append(prompt)
        if self.fail:
            raise ConnectionError("fake LM is unreachable")
        if not request.config.response_format:  # free text (a chat turn): the `reply` entry
            text = str(self._value("reply", {"type": "string"}, prompt))
        else:
            props = (request.config.response_format.get("schema") or {}).get("properties", {})
            text = json.dumps({name: self._value(name, s, prompt) for name, s in props.items()})
        return Response(id="fake", model="fake", message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(prompt) // 4, output_tokens=8))

    def score(self, messages: list[dict], continuations: list[str]) -> tuple[list[float], int]:
        """Label likelihoods, as the embedded engine gives them: the label the `answer` entry names
        for this prompt gets log-probability 0, every other label -5 (the reply is the adapter's JSON)."""
        prompt = "\n".join(m["content"] for m in messages)
        with self._lock:
            self.requests.append(prompt)
        if self.fail:
            raise ConnectionError("fake LM is unreachable")
        chosen = self._value("answer", {}, prompt) if "answer" in self.answers else None
        labels = [json.loads(c)["answer"] for c in continuations]
        chosen = chosen if chosen in labels else labels[0]
        return [0.0 if label == chosen else -5.0 for label in labels], len(prompt) // 4

    def stream(self, request):
        """The reply's events, its text word by word, as a model streams it."""
        for event in response_to_events(self.complete(request)):
            if event.type == "delta" and event.delta.type == "text":
                for word in re.findall(r"\S+\s*|\s+", event.delta.text):
                    yield StreamDeltaEvent(delta=dataclasses.replace(event.delta, text=word))
            else:
                yield event

    def close(self):
        pass


def fake_lm(answers: dict | None = None, fail: bool = False) -> dspy.LM:
    return dspy.LM("fake/model", engine=FakeEngine(answers, fail), cache=False)
