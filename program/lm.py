"""Language models: the embedded llama.cpp engine and `make_lm`, which turns an `--lm` string into a
`dspy.LM`.

`local/<name>` runs an embedded model in-process; anything else is a DSPy model string
(`openai/<model>` with `api_base=` for vLLM, Ollama or llama.cpp's server, or a hosted API).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, get_origin

import dspy
import json_repair
import jsonschema
import llama_cpp
import numpy as np
from dspy.clients.engines import LiteLLMEngine
from dspy.lm15 import (Message, Response, StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta, TextPart,
                       Usage, request_from_openai_chat, response_to_events)
from dspy.utils.exceptions import LMError
from llama_cpp import LLAMA_TOKEN_ATTR_CONTROL, Llama, LlamaRAMCache
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import models
from .isolated import IsolatedEngine

LOCAL_PREFIX = "local/"
FAKE_LM = "testing/fake"  # the fake LM by name, for processes that cannot be handed an LM object
DEFAULT_LM = LOCAL_PREFIX + models.DEFAULT_MODEL
# Bytes of kept prompt states per engine, in MB, for each of its two caches: scored prompts' prefixes
# (`_PrefixStates`) and generated prompts' states (`_RecentStates`).
PREFIX_CACHE_ENV, DEFAULT_PREFIX_CACHE_MB = "PERSONAAGENT_PREFIX_CACHE_MB", 256
# Batch sizes of a scored prompt (`LlamaCppEngine._batch_starts`): here batches of 96 tokens
# evaluate about as fast as one batch, 64 a tenth slower, 32 a quarter slower.
MIN_BATCH, MAX_BATCH = 16, 96


class LlamaCppEngine:
    """A DSPy 3.4 engine (`complete(Request) -> Response`) over one in-process llama.cpp model.

    One llama.cpp context is not thread-safe, so calls are serialized by a lock; parallelism
    means processes. A JSON schema sent by `dspy.JSONAdapter` is enforced as a grammar, so even
    small models return parseable output. `score` gives the log-probability of each of several
    answers to one prompt, for answering from label likelihoods (`program.answer.LabelPredict`).
    """

    supports_response_schema = True
    supported_params = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed", "response_format"})

    def __init__(self, model_name: str, n_ctx: int | None = None, n_threads: int | None = None, seed: int = 0,
                 max_string_chars: int = 300, max_items: int = 6, prefix_cache_mb: float | None = None):
        spec = models.get_model(model_name)
        # prepare() verifies the checksum (and rebuilds if needed): a corrupted file is never loaded.
        path = models.prepare(model_name, progress=False)
        self.model_name = model_name
        self.max_string_chars, self.max_items = max_string_chars, max_items
        self._lock = threading.Lock()
        # llama.cpp slows down sharply when its threads outnumber free cores: set PERSONAAGENT_THREADS
        # when other work shares the machine. Prompts too (batch threads default to every core: with
        # one core taken, a 60-token prompt stalled 4 to 8 s before its first token).
        threads = n_threads or int(os.environ.get("PERSONAAGENT_THREADS") or os.cpu_count() or 1)
        self._llama = _Llama(
            model_path=str(path),
            n_ctx=n_ctx or spec.context_window,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            verbose=False,
        )
        if prefix_cache_mb is None:
            prefix_cache_mb = float(os.environ.get(PREFIX_CACHE_ENV) or DEFAULT_PREFIX_CACHE_MB)
        capacity = int(prefix_cache_mb * 2**20)
        # Prompts of one signature share their header (field descriptions, then the persona), a chat
        # turn extends its conversation's last, and evaluating the prompt is most of a call's time
        # here: keep generated prompts' states so the next call starts from the longest shared prefix.
        if capacity:
            self._llama.set_cache(_RecentStates(capacity, self._is_control))
        self._scored_tokens = 0  # the context's first tokens, as `score` evaluated them
        # Scoring interleaves users: each one's fixed prefix (the persona's system message, their
        # demonstrations) is kept apart from the context too.
        self._prefixes = _PrefixStates(capacity)
        llama = self._llama
        token_text = lambda token: llama._model.token_get_text(token) if token != -1 else ""  # noqa: E731
        chat_template = (llama.metadata["tokenizer.chat_template"], token_text(llama.token_eos()),
                         token_text(llama.token_bos()))
        self._chat = Jinja2ChatFormatter(*chat_template)
        self._chat_before_reply = Jinja2ChatFormatter(*chat_template, add_generation_prompt=False)

    @staticmethod
    def _messages(request) -> list[dict]:
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        return messages

    def complete(self, request) -> Response:
        """One completion. A JSON schema is enforced as a llama.cpp grammar, but grammar sampling
        of free text is about ten times slower than plain decoding here, so a schema with free-text
        fields is first tried unconstrained and constrained only if that output does not validate."""
        config = request.config
        kwargs = self._settings(request)
        schema = (config.response_format or {}).get("schema")
        attempts = []
        if not config.response_format or (schema is not None and _has_free_text(schema)):
            attempts.append(self._generate(kwargs))
        if config.response_format and not (attempts and _valid_json(_text(attempts[-1]), schema)):
            grammar = {"schema": self._bounded(schema)} if schema is not None else {}
            attempts.append(self._generate({**kwargs, "response_format": {"type": "json_object", **grammar}}))
        out = attempts[-1]
        return Response(
            id=out.get("id") or uuid.uuid4().hex,
            model=LOCAL_PREFIX + self.model_name,
            message=Message.assistant([TextPart(_text(out))]),
            finish_reason="length" if out["choices"][0].get("finish_reason") == "length" else "stop",
            usage=Usage(input_tokens=sum(a["usage"]["prompt_tokens"] for a in attempts),
                        output_tokens=sum(a["usage"]["completion_tokens"] for a in attempts)),
        )

    def _settings(self, request) -> dict:
        """llama.cpp's chat completion arguments for a request, beside its response format."""
        config = request.config
        kwargs = {
            "messages": self._messages(request),
            "temperature": 0.0 if config.temperature is None else config.temperature,
            "max_tokens": config.max_tokens or 512,
        }
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.stop:
            kwargs["stop"] = list(config.stop)
        if config.seed is not None:
            kwargs["seed"] = config.seed
        return kwargs

    def stream(self, request) -> Iterator:
        """The reply's events as llama.cpp generates it, a text delta per token. Closing the stream
        stops the generation at the next token (llama.cpp's stream is a lazy generator). A request
        with a response format is answered whole first: its JSON is checked whole (see `complete`)."""
        if request.config.response_format:
            yield from response_to_events(self.complete(request))
            return
        with self._lock:
            self._scored_tokens = 0  # as in `_generate`
            chunks = self._llama.create_chat_completion(**self._settings(request), stream=True)
            with contextlib.closing(chunks):
                yield StreamStartEvent(id=uuid.uuid4().hex, model=LOCAL_PREFIX + self.model_name)
                finish, generated = "stop", 0
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    if choice["delta"].get("content"):
                        generated += 1
                        yield StreamDeltaEvent(delta=TextDelta(text=choice["delta"]["content"]))
                    if choice.get("finish_reason") == "length":
                        finish = "length"
            # llama.cpp's stream reports no usage: a text delta is about a token, the context holds
            # prompt and reply (read under the lock: another call may reuse the context after it).
            prompt_tokens = max(0, self._llama.n_tokens - generated)
        yield StreamEndEvent(finish_reason=finish, usage=Usage(input_tokens=prompt_tokens, output_tokens=generated))

    def score(self, messages: list[dict], continuations: list[str]) -> tuple[list[float], int]:
        """The log-probability of each continuation as the assistant's reply to `messages`, and
        the number of tokens evaluated. The prompt is evaluated once (resuming from a prefix
        already in the context, or kept from an earlier call, at a batch start: see `_batch_starts`;
        each prompt's fixed prefix is kept, see `_fixed_prefix`); the continuations are
        then scored as a tree from that shared state: at every token where they part, by the LM's
        distribution there. What follows the last parting is taken as given (a label's later
        tokens are its spelling), so a label is not penalized for being spelled in more tokens,
        and most label sets need no decoding beyond the prompt."""
        llama = self._llama
        prompt = self._chat(messages=messages).prompt
        full = [llama.tokenize((prompt + c).encode(), add_bos=False, special=True) for c in continuations]
        # Continuations share their first tokens (the reply's opening): evaluated once, with the prompt.
        shared = min(len(os.path.commonprefix(full)), *(len(f) - 1 for f in full))
        tokens = full[0][:shared]
        fixed = self._fixed_prefix(messages, prompt)
        with self._lock:
            starts = self._batch_starts(tokens)
            cached = llama.input_ids[:self._scored_tokens].tolist()
            common = min(len(os.path.commonprefix([cached, tokens])), shared - 1)
            reuse = max(start for start in starts if start <= common)
            saved = self._prefixes.longest(tokens, [start for start in starts if start > reuse])
            if saved is not None:
                self._scored_tokens = 0  # until this call has evaluated its prompt
                reuse, state = saved
                llama.load_state(state)
            keep = max(start for start in starts if start <= fixed)  # where this prompt's fixed prefix ends
            llama.n_tokens = reuse
            llama._ctx.kv_cache_seq_rm(-1, reuse, -1)
            for begin, end in zip(starts, [*starts[1:], shared]):
                if begin < reuse:
                    continue
                if begin == keep > 0 and tuple(tokens[:keep]) not in self._prefixes:
                    self._prefixes.add(tuple(tokens[:keep]), llama.save_state())  # all the context holds now
                llama.eval(tokens[begin:end])
            self._evaluated = shared - reuse
            scores = self._tree([f[shared:] for f in full], shared, _log_softmax(self._logits()))
            # The context holds the shared prefix again, as the next call's prefix search expects;
            # its logits are the tree's last, not the prefix's: a generation must not sample from them.
            llama._ctx.kv_cache_seq_rm(-1, shared, -1)
            llama.n_tokens = self._scored_tokens = shared
            llama._requires_eval = True
        return scores, self._evaluated

    def _fixed_prefix(self, messages: list[dict], prompt: str) -> int:
        """How many of the prompt's tokens come before its last message: a user's fixed prefix (the
        system message with the persona, the demonstrations), shared by all their questions."""
        before = self._chat_before_reply(messages=messages[:-1]).prompt if len(messages) > 1 else ""
        if not prompt.startswith(before):
            return 0
        return len(self._llama.tokenize(before.encode(), add_bos=False, special=True))

    def _is_control(self, token: int) -> bool:
        """Whether `token` is a control token, such as a turn marker (`<|im_start|>`)."""
        return bool(self._llama._model.token_get_attr(token) & LLAMA_TOKEN_ATTR_CONTROL)

    def _batch_starts(self, tokens: list[int]) -> list[int]:
        """Where a scored prompt's batches start: at every turn marker (a control token such as
        `<|im_start|>`) at least `MIN_BATCH` tokens after the last start, else every `MAX_BATCH`
        tokens. llama.cpp's numbers for a token depend on the batch it was evaluated in, so a
        prompt resumed from an arbitrary prefix is scored slightly differently (by up to 0.12 in
        log-probability on the 1.5B model, enough to flip a near tie). A start depends only on the
        tokens before it, so every prompt is evaluated in the same batches up to where it parts
        from another, and resuming only at a batch start (and only from what scoring itself
        evaluated: generation batches differently) gives the same scores whatever was asked
        before. Turn markers as starts keep a persona's system message reusable across its
        questions."""
        starts = [0]
        for position, token in enumerate(tokens):
            since = position - starts[-1]
            if since >= MAX_BATCH or (since >= MIN_BATCH and self._is_control(token)):
                starts.append(position)
        return starts

    def _tree(self, rests: list[list[int]], position: int, log_probs: np.ndarray) -> list[float]:
        """Scores of token sequences that follow the same state (`log_probs`: its next-token
        distribution, at `position`): each sequence's first token, then, where several share it,
        what follows it from the state after it."""
        scores = [0.0] * len(rests)
        groups: dict[int, list[int]] = {}
        for i, rest in enumerate(rests):
            if rest:
                groups.setdefault(rest[0], []).append(i)
        for token, members in groups.items():
            for i in members:
                scores[i] = float(log_probs[token])
            if len(members) > 1 and any(len(rests[i]) > 1 for i in members):
                llama = self._llama
                llama._ctx.kv_cache_seq_rm(-1, position, -1)
                llama._batch.set_batch([token], n_past=position, logits_all=False)
                llama._ctx.decode(llama._batch)
                self._evaluated += 1
                deeper = self._tree([rests[i][1:] for i in members], position + 1, _log_softmax(self._logits()))
                for i, extra in zip(members, deeper):
                    scores[i] += extra
        return scores

    def _logits(self) -> np.ndarray:
        """The logits at the last decoded position (a copy)."""
        llama = self._llama
        return np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama._n_vocab,)).copy()

    def _generate(self, kwargs: dict) -> dict:
        with self._lock:
            self._scored_tokens = 0  # generation leaves a context batched its own way: not resumed by `score`
            return self._llama.create_chat_completion(**kwargs)

    def _bounded(self, schema):
        """Bound every open string and list in the schema: a small model caught in a repetition
        loop then stops at the bound instead of running out of tokens mid-JSON."""
        if isinstance(schema, list):
            return [self._bounded(s) for s in schema]
        if not isinstance(schema, dict):
            return schema
        out = {k: self._bounded(v) for k, v in schema.items()}
        if out.get("type") == "string" and "enum" not in out and "const" not in out:
            out.setdefault("maxLength", self.max_string_chars)
        if out.get("type") == "array":
            out.setdefault("maxItems", self.max_items)
        return out

    def self_test(self, prompt: str) -> str:
        """One real decode: a build that cannot run on this CPU dies in its first matrix products."""
        return _text(self._generate({"messages": [{"role": "user", "content": prompt}], "max_tokens": 2,
                                     "temperature": 0.0}))

    def close(self) -> None:
        self._llama.close()


@dataclass(frozen=True, eq=False)
class _SequenceState:
    """The context's state as a prompt cache needs it: its tokens and their KV cells (about 28 KB a
    token on the 1.5B model). llama-cpp-python's own state also copies the logits buffer (about
    300 MB for Qwen's vocabulary), so only a few fit in memory; a restored prompt's last token is
    evaluated again anyway (`Llama.generate`), which gives the logits to sample from."""

    input_ids: np.ndarray
    n_tokens: int
    llama_state: ctypes.Array

    @property
    def llama_state_size(self) -> int:  # the bytes a cache counts (as `LlamaRAMCache` does)
        return len(self.llama_state)


class _Llama(Llama):
    """llama.cpp's model whose saved states are `_SequenceState`s: the KV cells, not the logits."""

    def save_state(self) -> _SequenceState:
        ctx = self._ctx.ctx
        cells = (ctypes.c_uint8 * llama_cpp.llama_state_seq_get_size(ctx, 0))()
        if llama_cpp.llama_state_seq_get_data(ctx, cells, len(cells), 0) != len(cells):
            raise RuntimeError(f"llama.cpp could not copy a prompt state of {self.n_tokens} tokens")
        return _SequenceState(self.input_ids[:self.n_tokens].copy(), self.n_tokens, cells)

    def load_state(self, state: _SequenceState) -> None:
        # The sampling seed is not part of a state: restoring a prompt does not rewind it.
        self._ctx.kv_cache_clear()
        self.n_tokens, self._requires_eval = 0, True  # consistent with the cleared cells if the restore fails
        if llama_cpp.llama_state_seq_set_data(self._ctx.ctx, state.llama_state, len(state.llama_state), 0) \
                != len(state.llama_state):
            raise RuntimeError(f"llama.cpp could not restore a kept prompt state of {state.n_tokens} tokens")
        self.input_ids[:state.n_tokens] = state.input_ids
        self.n_tokens = state.n_tokens  # no logits were restored: the next call evaluates before it samples


class _RecentStates(LlamaRAMCache):
    """llama.cpp's prompt cache of generated prompts' states (`_SequenceState`s), the least recently
    used dropped past `capacity_bytes`: 256 MB hold about 9,000 tokens of the 1.5B model's prompts
    (a few hundred tokens a signature's header, a conversation's turns)."""

    def __init__(self, capacity_bytes: int, is_control: Callable[[int], bool]):
        super().__init__(capacity_bytes)
        self.is_control = is_control

    def __setitem__(self, key, value) -> None:
        # A state is superseded by a new one that shares all of it up to its last turn marker (the
        # start of the reply it generated): the conversation's next turn extends the new one, which
        # resumes every such prompt as far (the reply, written back by the client and tokenized
        # again, may part from the generated tokens). Dropped, one conversation's turns do not push
        # another's state out.
        key = tuple(key)
        for kept in [k for k in self.cache_state if self._shares_turns(k, key)]:
            del self.cache_state[kept]
        if value.llama_state_size <= self.capacity_bytes:  # larger alone, it would push out every state, then itself
            super().__setitem__(key, value)

    def _shares_turns(self, kept: tuple[int, ...], key: tuple[int, ...]) -> bool:
        """Whether `key` begins with `kept` up to and including its last turn marker (all of it
        if it has none)."""
        end = next((i + 1 for i in range(len(kept) - 1, -1, -1) if self.is_control(kept[i])), len(kept))
        return key[:end] == kept[:end] and len(key) >= end


class _PrefixStates:
    """Kept states of scored prompts' prefixes, by their tokens, the least recently used dropped
    past `capacity` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self._states: OrderedDict[tuple[int, ...], _SequenceState] = OrderedDict()

    def __contains__(self, prefix: tuple[int, ...]) -> bool:
        return prefix in self._states

    def longest(self, tokens: list[int], ends: list[int]) -> tuple[int, _SequenceState] | None:
        """The longest kept prefix of `tokens` that ends at one of `ends`: (its length, its state)."""
        for end in reversed(ends):
            prefix = tuple(tokens[:end])
            if prefix in self._states:
                self._states.move_to_end(prefix)
                return end, self._states[prefix]
        return None

    def add(self, prefix: tuple[int, ...], state: _SequenceState) -> None:
        if state.llama_state_size > self.capacity:
            return
        self._states[prefix] = state
        self.size += state.llama_state_size
        while self.size > self.capacity:
            self.size -= self._states.popitem(last=False)[1].llama_state_size


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _has_free_text(schema) -> bool:
    """Whether the schema lets the model write free text (a string that is no enum or constant)."""
    if isinstance(schema, list):
        return any(_has_free_text(s) for s in schema)
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
        return True
    return any(_has_free_text(v) for k, v in schema.items() if k not in ("enum", "const"))


def _text(completion: dict) -> str:
    return completion["choices"][0]["message"].get("content") or ""


def _valid_json(text: str, schema: dict | None) -> bool:
    """Whether DSPy's JSON adapter will parse `text` into the schema (it repairs JSON the same way)."""
    try:
        value = json_repair.loads(text)
        if not isinstance(value, dict) or not value:
            return False
        if schema is not None:
            jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


_engines: dict[str, IsolatedEngine] = {}
_engines_lock = threading.Lock()


@atexit.register
def _close_engines() -> None:
    for engine in _engines.values():
        engine.close()
    _engines.clear()


def local_engine(model_name: str) -> IsolatedEngine:
    """One engine per embedded model per process (loading weights twice only wastes memory), in a
    child process of its own, so a native crash fails only the calls it held (`program.isolated`)."""
    with _engines_lock:
        if model_name not in _engines:
            _engines[model_name] = IsolatedEngine(model_name)
        return _engines[model_name]


def make_lm(spec: str = DEFAULT_LM, *, cache: bool = False, api_base: str | None = None, **kwargs) -> dspy.LM:
    """`local/<name>` for an embedded model, else any DSPy model string (kwargs go to `dspy.LM`),
    served at `api_base` when given (vLLM, Ollama, llama.cpp's server).

    Uncached by default: DSPy's cache would keep users' text on disk (and in memory) after they
    are forgotten. Benchmarks over fixed data may pass `cache=True`."""
    if api_base:
        if spec.startswith(LOCAL_PREFIX) or spec == FAKE_LM:
            raise ValueError(f"--api-base {api_base} names a server, but {spec!r} is embedded: "
                             "pass the server's model, e.g. --lm openai/<model>")
        kwargs["api_base"] = api_base
        # A local server (vLLM, Ollama, llama.cpp's) wants no key, but DSPy refuses a call without one.
        kwargs.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or "unused")
    if spec == FAKE_LM:
        from .testing import fake_lm  # deterministic: every field its type's first value; no model

        return fake_lm()
    if spec.startswith(LOCAL_PREFIX):
        name = spec[len(LOCAL_PREFIX):]
        if name not in models.MODELS:
            raise ValueError(
                f"unknown model {spec!r}; embedded models: "
                + ", ".join(LOCAL_PREFIX + m for m in models.MODELS)
                + "; or pass any DSPy model string such as openai/<model> (with --api-base for a local server)"
            )
        return dspy.LM(spec, engine=local_engine(name), cache=cache, temperature=0.0,
                       max_tokens=kwargs.pop("max_tokens", 512), **kwargs)
    if "/" not in spec:
        raise ValueError(
            f"unknown model {spec!r}; use one of "
            + ", ".join(LOCAL_PREFIX + m for m in models.MODELS)
            + " or a DSPy model string 'provider/model' (e.g. openai/gpt-4o-mini, ollama_chat/llama3)"
        )
    return dspy.LM(spec, cache=cache, **kwargs)


GENERATION_SETTINGS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed")


def stream_reply(lm: dspy.LM, messages: list[dict]) -> Iterator[str]:
    """`lm`'s reply to OpenAI-style chat `messages`, in text pieces as it generates them, with the LM's
    generation settings: from its engine's stream (the embedded engine, the fake), or, for a served LM,
    from LiteLLM's stream of the server's reply. Closing it closes the engine's stream, which stops the
    generation (the embedded engine's child, at its next token; a server sees its connection closed).
    An engine's failure is an `LMError`, as in a DSPy call."""
    settings = {k: v for k, v in lm.kwargs.items() if k in GENERATION_SETTINGS and v is not None}
    request = request_from_openai_chat({"model": lm.model, "messages": messages, **settings})
    engine = lm.engine
    if isinstance(engine, str):  # a served LM (DSPy picks its engine per call): the rest of its settings reach it
        engine = LiteLLMEngine(**{k: v for k, v in lm.kwargs.items() if k not in GENERATION_SETTINGS})
    events = engine.stream(request)
    try:
        for event in events:
            if event.type == "delta" and event.delta.type == "text" and event.delta.text:
                yield event.delta.text
    except Exception as exc:
        raise LMError(f"{type(exc).__name__}: {exc}", model=lm.model) from exc
    finally:
        events.close()


class CompactJSONAdapter(dspy.JSONAdapter):
    """DSPy's JSON adapter, except that the reminder closing the user message does not list a
    `Literal` field's labels again: the system message lists them twice already, and the reminder
    follows the question, past any prefix the engine has cached. With LaMP-2N's 15 categories
    that is about 70 tokens of every call, about 2 s on the embedded model."""

    # By output fields (one entry a task, no user's text): remaking a signature was most of a call's
    # own time, about 3 ms.
    _reminders: dict[tuple, str] = {}

    def user_message_output_requirements(self, signature: type[dspy.Signature]) -> str:
        outputs = tuple((name, field.annotation) for name, field in signature.output_fields.items())
        if outputs not in self._reminders:
            for name, field in signature.output_fields.items():
                if get_origin(field.annotation) is Literal:
                    signature = signature.with_updated_fields(name, type_=str)
            self._reminders[outputs] = super().user_message_output_requirements(signature)
        return self._reminders[outputs]

    def format_field_with_value(self, fields_with_values: dict, role: str = "user") -> str:
        # Output fields whose values are all text (a demonstration's answer) are JSON as they are:
        # DSPy's serializer builds a pydantic schema for their dict on every call, about a tenth of
        # an answer's own time.
        if role == "assistant" and all(isinstance(value, str) for value in fields_with_values.values()):
            return json.dumps({field.name: value for field, value in fields_with_values.items()}, indent=2,
                              ensure_ascii=False)
        return super().format_field_with_value(fields_with_values, role)


def use_lm(lm: dspy.LM):
    """Run DSPy calls on `lm` with the (compact) JSON adapter: with a schema-aware engine the
    output is grammar-constrained, so even small models answer in the declared types at one call
    each."""
    return dspy.context(lm=lm, adapter=CompactJSONAdapter())


class UsageMeter:
    """Counts LM calls, tokens and seconds spent inside a block, from the LM's history."""

    def __init__(self, lm: dspy.LM):
        self.lm = lm

    def __enter__(self) -> "UsageMeter":
        self._start = len(self.lm.history)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        entries = self.lm.history[self._start:]
        tokens = [int((e.get("usage") or {}).get("total_tokens") or 0) for e in entries]
        self.calls = sum(t > 0 for t in tokens)  # answered from DSPy's cache: no usage, no call
        self.cached = len(tokens) - self.calls
        self.tokens = sum(tokens)
        self.seconds = time.perf_counter() - self._t0
