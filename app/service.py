"""Serving compiled personas: `PersonaService` answers for any user of a store.

    service = PersonaService("compiled/")                    # the embedded model by default
    service.answer("alice", "What score would you give ...?").answer

- Programs stay loaded for the most recently used users (LRU). Before each use one `stat` of the
  user's program and profile files tells whether a compile (in any process) or an alignment has
  replaced them; the program is then reloaded, so a new version is served without a restart.
- A user without a compiled program gets the default program: their memory and profile under
  `default_task`, with the persona written from the profile.
- LM work runs on a few worker threads (one for the embedded model: one llama.cpp context) behind
  a bounded FIFO queue. Every queued answer has a deadline: a caller is told to retry (with a
  hint) when the queue is full or would not reach them in time, an answer that waited past its
  deadline is dropped before the LM, and so is one whose caller gave up (`Future.cancel`).
- A chat turn can be streamed (`stream_chat`): the reply's pieces as the LM generates them, queued
  like an answer; closing the stream stops the LM.
- Closing cancels what is queued, lets running answers finish, and abandons a running alignment
  (nothing of it is saved: a version is written only at its end, atomically).
- Test-time alignment runs in the background on the user's latest interactions with a known
  answer, on request or online (`align_every`: after every N new outcomes of a user), and records
  every persona version, with what triggered it, in the user's program file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import dspy
import faiss
from dspy.utils.exceptions import AdapterParseError, LMError

from ..data.loaders import UserData, memory_replays
from ..data.tasks import Interaction, TaskSpec, generic_task, task_from_dict, task_to_dict
from ..optimizers import pipeline
from ..optimizers.pipeline import CompileConfig
from ..optimizers.population import PopulationModel
from ..optimizers.tracking import (MlflowObserver, Observer, PromptRegistry, Tracker, forget_user, registered_persona,
                                   seconds_metrics)
from ..program.agent import PersonaProgram
from ..program.embedder import MiniLMEmbedder
from ..program.memory import Cutoff
from ..program.lm import LOCAL_PREFIX, make_lm, stream_reply, use_lm
from ..program.storage import validate_user_id
from ..program.store import ProgramState, UserStore
from ..program.tools import render_records, similar_records

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ServiceError(Exception):
    """A request the service cannot serve; the message says why, for the caller."""


class InvalidRequest(ServiceError, ValueError):
    pass


class NotFound(ServiceError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class AlignmentRunning(ServiceError):
    def __init__(self, job_id: str):
        super().__init__(f"an alignment of this user is already running (job {job_id})")
        self.job_id = job_id


class Unavailable(ServiceError):
    """Temporary: the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class LMUnavailable(Unavailable):
    pass


class ServiceBusy(Unavailable):
    pass


class StoreUnavailable(Unavailable):
    pass


@dataclass
class Answer:
    user_id: str
    answer: str
    persona_version: int | None  # None: the default program (nothing compiled yet)
    tools: list[str]
    # Closed-set tasks: the probability of every label, the answer's, and how they were obtained
    # ("likelihood": scored by the LM; "generation": the LM gave no scores, the answer has them all).
    label_scores: dict[str, float] | None = None
    confidence: float | None = None
    scoring: str | None = None


@dataclass
class ChatReply:
    user_id: str
    reply: str
    persona_version: int | None


class ReplyStream:
    """A chat reply as the LM generates it: iterate it (blocking) or `async for` it (no thread waits)
    for its text pieces; an error of the LM is raised where the reply stopped. `close` stops the
    generation (one still queued never reaches the LM)."""

    def __init__(self):
        self._next: Future = Future()  # the next piece: (piece, the future after it), or None at the end
        self._tail = self._next  # where the LM's work puts the next piece
        self._closed = threading.Event()
        self.work: Future | None = None  # the queued work that generates it

    def __iter__(self) -> "ReplyStream":
        return self

    def __next__(self) -> str:
        piece = self._take(self._next.result())
        if piece is None:
            raise StopIteration
        return piece

    def __aiter__(self) -> "ReplyStream":
        return self

    async def __anext__(self) -> str:
        # Shielded: a consumer cancelled while it waits must not cancel the future the LM's work fills.
        piece = self._take(await asyncio.shield(asyncio.wrap_future(self._next)))
        if piece is None:
            raise StopAsyncIteration
        return piece

    def _take(self, link: tuple | None) -> str | None:
        if link is None:
            return None
        piece, self._next = link
        return piece

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        if self.work is not None:
            self.work.cancel()

    def _put(self, piece: str) -> None:
        link, self._tail = self._tail, Future()
        link.set_result((piece, self._tail))

    def _end(self, work: Future) -> None:
        """When the work is done: the end of the reply, or its error."""
        error = None if work.cancelled() else work.exception()
        if error is None:
            self._tail.set_result(None)
        else:
            self._tail.set_exception(error)


@dataclass
class AlignJob:
    id: str
    user_id: str
    n_recent: int
    iterations: int
    optimizer: str = CompileConfig.optimizer
    trigger: str = "align request"  # or "online: N new interactions with known outcomes"
    status: JobStatus = "queued"
    error: str = ""
    new_versions: list[int] = field(default_factory=list)
    current_version: int | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None


@dataclass
class _Loaded:
    program: PersonaProgram
    state: ProgramState | None
    stamp: tuple
    version: int | None = None  # the persona version it serves (None: the default program)


log = logging.getLogger(__name__)
REGISTRY_REFRESH_S = 30  # with `persona_alias`: how often a user's persona is read again from the registry


def _keep_recent(entries: OrderedDict, key, value, size: int) -> None:
    """Put `value` under `key` as the most recently used, dropping the least recently used past `size`."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > size:
        entries.popitem(last=False)


class _RegisteredPersonas:
    """Each user's persona under the service's alias in the prompt registry: `(text, version)`, or
    None where the registry has none (or is out of reach). Read again when the user's files changed
    or `REGISTRY_REFRESH_S` after the last read: a moved alias is seen within that time, and a user
    whose alias did not move keeps their loaded program, instead of every loaded program being
    rebuilt every `REGISTRY_REFRESH_S`. The `size` latest reads are kept. Concurrent requests of a
    user whose read expired may each read the registry: a few reads, not worth a wait."""

    def __init__(self, alias: str, tracking_uri: str, size: int = 1024):
        self.alias, self.tracking_uri, self.size = alias, tracking_uri, size
        self._read: OrderedDict[str, tuple[float, tuple, tuple[str, int | None] | None]] = OrderedDict()
        self._forgotten = 0  # how many `forget`s so far: a read begun before one is not kept
        self._lock = threading.Lock()

    def get(self, user_id: str, files: tuple) -> tuple[str, int | None] | None:
        now = time.monotonic()
        with self._lock:
            read_at, read_files, persona = self._read.get(user_id, (float("-inf"), None, None))
            forgotten = self._forgotten
        if read_files == files and now - read_at < REGISTRY_REFRESH_S:
            return persona
        try:
            persona = registered_persona(user_id, self.alias, self.tracking_uri)
        except KeyError as exc:
            log.warning("%s; serving the store's persona in force", exc.args[0])
            persona = None
        with self._lock:
            if forgotten == self._forgotten:  # else the alias may have moved during the read
                _keep_recent(self._read, user_id, (now, files, persona), self.size)
        return persona

    def forget(self, user_id: str) -> None:
        with self._lock:
            self._read.pop(user_id, None)
            self._forgotten += 1


class _ConversationPasts:
    """The past interactions shown to each conversation, by (user, opening message, first reply),
    the least recently used forgotten past `size`: every turn shows exactly what its first turn
    showed. Searching again would not: once the conversation's own turns are remembered, the
    full-text ranking's word statistics move, the system prompt changes, and the engine has nothing
    to resume."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._pasts: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            if key in self._pasts:
                self._pasts.move_to_end(key)
            return self._pasts.get(key)

    def put(self, key: tuple[str, str, str], past: str) -> None:
        with self._lock:
            _keep_recent(self._pasts, key, past, self.size)

    def forget(self, user_id: str) -> None:
        with self._lock:
            for key in [k for k in self._pasts if k[0] == user_id]:
                del self._pasts[key]


def _unknown(user_id: str) -> NotFound:
    return NotFound(f"unknown user {user_id!r}: add an interaction or compile the user first")


def _single_threaded_search() -> None:
    """FAISS's thread count is per thread: each worker sets its own. Searching one query with
    OpenMP's default team costs 8 ms of CPU here, alone it costs 0.01 ms."""
    faiss.omp_set_num_threads(1)


class PersonaService:
    """Answers, remembers and aligns for every user of a compile output directory; thread-safe."""

    def __init__(self, store: str | Path | UserStore, lm: dspy.LM | str = CompileConfig.lm, *,
                 reflection_lm: dspy.LM | None = None, default_task: TaskSpec | None = None,
                 max_loaded: int = 256, lm_workers: int | None = None, max_queued: int = 64,
                 lm_retry_after: int = 5, tracking_uri: str | None = None,
                 max_versions: int = CompileConfig.max_versions,
                 answer_deadline: float = 60.0, align_every: int | None = None,
                 register_prompts: bool = CompileConfig.register_prompts, persona_alias: str | None = None):
        if (register_prompts or persona_alias) and not tracking_uri:
            raise ValueError("the prompt registry is MLflow's: "
                             "give tracking_uri with register_prompts or persona_alias")
        self.store = store if isinstance(store, UserStore) else UserStore(store, max_versions=max_versions)
        # Where compiles of this store were tracked: deleting a user deletes their runs.
        self.tracking_uri = tracking_uri
        # Accepted versions (alignments, rollbacks) go to the prompt registry; with `persona_alias`,
        # each user's persona text is the registry's version under that alias (e.g. "champion").
        self.register_prompts = register_prompts
        self._alias_reads = _RegisteredPersonas(persona_alias, tracking_uri) if persona_alias else None
        self.lm = make_lm(lm) if isinstance(lm, str) else lm
        self.reflection_lm = reflection_lm
        # The settings of an alignment: `CompileConfig`'s defaults, an align request overriding its own.
        self.config = CompileConfig(lm=self.lm.model, max_versions=self.store.max_versions,
                                    register_prompts=register_prompts)
        self.default_task = default_task or generic_task("generation")
        self.max_loaded, self.max_queued, self.lm_retry_after = max_loaded, max_queued, lm_retry_after
        self.answer_deadline = answer_deadline  # seconds an answer may wait in the queue
        self.align_every = align_every  # online alignment after this many new outcomes per user (None: off)
        self._outcomes_since_alignment: dict[str, int] = {}
        self.lm_workers = lm_workers or (1 if self.lm.model.startswith(LOCAL_PREFIX) else 8)
        if isinstance(self.store.embedder, MiniLMEmbedder):  # loaded now, not by the first request
            import torch

            # Requests embed one text at a time, next to the LM's own threads: torch's thread pool
            # only adds contention (p95 of one embedding: 68 ms with 2 threads, 11 ms with 1, beside
            # an LM at work on 2 cores). This setting holds for every thread.
            torch.set_num_threads(1)
        self._programs: OrderedDict[str, _Loaded] = OrderedDict()
        self._pasts = _ConversationPasts()
        self._jobs: dict[str, AlignJob] = {}
        self._deletions: dict[str, int] = {}  # per user: an alignment that saw a deletion must not save
        self._lock = threading.Lock()
        self._user_locks = [threading.Lock() for _ in range(64)]  # appends, deletes and saves of one user
        self._queued = 0
        self._answer_seconds = 1.0  # running mean, for the retry hint
        self._readiness: tuple[float, str | None] = (float("-inf"), None)  # (checked at, why not ready)
        self._lm_pool = ThreadPoolExecutor(self.lm_workers, "persona-lm", initializer=_single_threaded_search)
        # Alignments run one at a time on a daemon thread: closing does not wait minutes for one.
        self._align_queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run_alignments, name="persona-align", daemon=True).start()

    # ------------------------------------------------------------------ programs

    def program(self, user_id: str) -> PersonaProgram:
        """The program serving `user_id`: their compiled one, else the default program."""
        return self._loaded(self._existing(user_id)).program

    def not_ready(self) -> str | None:
        """Why users cannot be served now (None: they can); checked at most once a second."""
        checked, reason = self._readiness
        if time.monotonic() - checked > 1.0:
            reason = self.store.unwritable()
            self._readiness = (time.monotonic(), reason)
        return reason

    @property
    def engine_state(self) -> str | None:
        """The embedded engine's state (`ready`, `restarting` after a crash, `failed`); None for a
        served LM. Users' other endpoints keep working whatever it is."""
        return getattr(self.lm.engine, "state", None)

    def _require_ready(self) -> None:
        reason = self.not_ready()
        if reason:
            raise StoreUnavailable(reason, self.lm_retry_after)

    def _valid(self, user_id: str) -> str:
        """A user id the store can hold, while the store can be written."""
        try:
            validate_user_id(user_id)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._require_ready()
        return user_id

    def _existing(self, user_id: str) -> str:
        self._valid(user_id)
        if not self.store.user_dir(user_id).exists():
            raise _unknown(user_id)
        return user_id

    def _user_lock(self, user_id: str) -> threading.Lock:
        return self._user_locks[hash(user_id) % len(self._user_locks)]

    def _stamp(self, user_id: str) -> tuple:
        """Changes whenever the program or profile file is replaced (each atomic write is a new file)."""
        directory = self.store.user_dir(user_id)
        stamp = []
        for name in ("program.json", "profile.json"):
            try:
                st = os.stat(directory / name)
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append(None)
        if self._alias_reads:  # the registry's persona is part of what a compiled program is built from
            stamp.append(self._alias_reads.get(user_id, tuple(stamp)) if stamp[0] is not None else None)
        return tuple(stamp)

    def _forget_registered(self, user_id: str) -> None:
        """After the registry's alias for the user moved (or the user is gone): read it again."""
        if self._alias_reads:
            self._alias_reads.forget(user_id)

    def _loaded(self, user_id: str) -> _Loaded:
        stamp = self._stamp(user_id)
        with self._lock:
            loaded = self._programs.get(user_id)
            if loaded is not None and loaded.stamp == stamp:
                self._programs.move_to_end(user_id)
                return loaded
        # Under the user's lock: a user being deleted is neither recreated by loading nor cached after.
        with self._user_lock(user_id):
            if not self.store.user_dir(user_id).exists():
                raise _unknown(user_id)
            loaded = self._load(user_id, stamp)
            with self._lock:
                _keep_recent(self._programs, user_id, loaded, self.max_loaded)
        return loaded

    def _load(self, user_id: str, stamp: tuple) -> _Loaded:
        state = self.store.load_state(user_id)
        if state is None:
            return _Loaded(self.store.build(user_id, self.default_task), None, stamp)
        version = state.current
        registered = stamp[-1] if self._alias_reads else None  # as `_stamp` read it
        if registered is not None:
            # The registry's text, over the compiled choices of the version it was registered from
            # (the one in force for a text written in the registry itself). A user with no version
            # under the alias (compiled without --register-prompts), or a registry out of reach, is
            # served the store's persona in force: the same user, never an error.
            text, number = registered
            base = next((v for v in state.versions if v.version == number), state.current)
            version = replace(base, instructions={**base.instructions, "answer": text})
        return _Loaded(self.store.restore(user_id, task_from_dict(state.task), version), state, stamp, version.version)

    # ------------------------------------------------------------------ answering

    def answer(self, user_id: str, text: str) -> Answer:
        return self.submit_answer(user_id, text).result()

    def submit_answer(self, user_id: str, text: str) -> Future:
        """Queue an answer; the future gives an `Answer` or raises `LMUnavailable` or `ServiceBusy`
        (it waited past its deadline). Cancelling it before it starts keeps it from the LM."""
        user_id = self._existing(user_id)
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("the question text must be a non-empty string")
        return self._enqueue(self._answer, user_id, text)

    def submit_chat(self, user_id: str, messages: list[dict]) -> Future:
        """Queue one chat turn (OpenAI-style `messages`, the last from the user); the future gives a
        `ChatReply`. The user's persona is the system prompt, their past interactions most like the
        conversation's opening message are in it (`_chat_turns`), and the turn is appended to their
        memory. A new user is created."""
        self._chat_user(user_id, messages)
        return self._enqueue(self._chat, user_id, messages)

    def stream_chat(self, user_id: str, messages: list[dict]) -> ReplyStream:
        """Queue one chat turn as `submit_chat` does; its reply comes as the LM generates it (see
        `ReplyStream`). The turn is appended to the user's memory once the reply is complete, before
        the stream ends; a stream closed before then appends nothing."""
        self._chat_user(user_id, messages)
        stream = ReplyStream()
        stream.work = self._enqueue(self._stream_chat, user_id, messages, stream)
        stream.work.add_done_callback(stream._end)
        return stream

    def _chat_user(self, user_id: str, messages: list[dict]) -> None:
        self._valid(user_id)
        if not messages or messages[-1].get("role") != "user" or not str(messages[-1].get("content") or "").strip():
            raise InvalidRequest("the last message must be the user's, with content")
        with self._user_lock(user_id):
            self.store.memory(user_id)  # a new user gets their directory, as an appended interaction would

    def _enqueue(self, work, user_id: str, *args) -> Future:
        with self._lock:
            expected_wait = self._queued * self._answer_seconds / self.lm_workers
            retry_after = max(1, math.ceil(expected_wait))
            if self._queued >= self.max_queued:
                raise ServiceBusy(f"{self._queued} answers are queued; retry later", retry_after)
            if expected_wait > self.answer_deadline:
                raise ServiceBusy(f"the queue would take about {expected_wait:.0f} s, "
                                  f"over the {self.answer_deadline:g} s an answer may wait; retry later", retry_after)
            self._queued += 1
        future = self._lm_pool.submit(self._run_queued, work, time.monotonic() + self.answer_deadline, user_id, *args)
        future.add_done_callback(self._dequeue_if_cancelled)
        return future

    def _dequeue_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # it never ran, so `_run_queued` did not count it out
            with self._lock:
                self._queued -= 1

    def _run_queued(self, work, deadline: float, *args):
        started = time.perf_counter()
        try:
            if time.monotonic() > deadline:
                raise ServiceBusy(f"the answer waited over {self.answer_deadline:g} s in the queue; retry later",
                                  self.lm_retry_after)
            with use_lm(self.lm), dspy.context(disable_history=True):
                return work(*args)
        except (LMError, AdapterParseError) as exc:
            raise LMUnavailable(f"the language model failed: {exc}", self.lm_retry_after) from exc
        finally:
            with self._lock:
                self._queued -= 1
                self._answer_seconds = 0.9 * self._answer_seconds + 0.1 * (time.perf_counter() - started)

    def _answer(self, user_id: str, text: str) -> Answer:
        loaded = self._loaded(user_id)
        pred = loaded.program(question=text)
        return Answer(user_id, str(pred.answer), loaded.version, [step["tool"] for step in pred.trajectory],
                      pred.get("label_scores"), pred.get("confidence"), pred.get("scoring"))

    def _chat_turns(self, user_id: str, program: PersonaProgram, messages: list[dict]) -> tuple[list[dict], Callable]:
        """The LM's messages for a chat turn, and what to call with its reply: the persona and the
        user's past interactions most like the conversation's opening message as the system prompt,
        then the conversation. Shown for the opening message, not the latest, and the same at every
        turn (kept by `_ConversationPasts`): then every turn's prompt extends the one before it and
        its reply, so the engine resumes from the previous turn's evaluated state and evaluates only
        the new message, instead of the whole conversation behind a changed system prompt."""
        text = [str(m.get("content") or "") for m in messages]
        opening = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
        first_reply = (text[opening + 1] if opening + 1 < len(messages)
                       and messages[opening + 1].get("role") == "assistant" else None)
        past = self._pasts.get((user_id, text[opening], first_reply)) if first_reply is not None else None
        if past is None:
            # A first turn, or one whose conversation is no longer kept: memory as of its first turn
            # (remembered with its reply), without the conversation's own turns.
            started = None if first_reply is None else next(
                (r for r in program.memory.with_input(text[opening]) if r.metadata.get("reply") == first_reply), None)
            with program.memory.as_of(Cutoff.of(started) if started else None):
                past = render_records(similar_records(program.task, program.memory, text[opening], program.k))
        system = f"{program.instructions}\n\nThis user's past interactions most like this conversation:\n{past}"
        # OpenAI's "developer" messages are system instructions; tool messages have no place here.
        roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
        turns = [{"role": "system", "content": system}] + [
            {"role": roles[m["role"]], "content": t} for m, t in zip(messages, text) if m.get("role") in roles]

        def remember(reply: str) -> None:
            self.add_interaction(user_id, text[-1], metadata={"source": "chat", "reply": reply})
            if first_reply is None:
                self._pasts.put((user_id, text[opening], reply), past)
        return turns, remember

    def _chat(self, user_id: str, messages: list[dict]) -> ChatReply:
        loaded = self._loaded(user_id)
        turns, remember = self._chat_turns(user_id, loaded.program, messages)
        output = self.lm(messages=turns)[0]
        reply = output if isinstance(output, str) else str(output.get("text", ""))
        remember(reply)
        return ChatReply(user_id, reply, loaded.version)

    def _stream_chat(self, user_id: str, messages: list[dict], stream: ReplyStream) -> ChatReply | None:
        loaded = self._loaded(user_id)
        turns, remember = self._chat_turns(user_id, loaded.program, messages)
        pieces = []
        with contextlib.closing(stream_reply(self.lm, turns)) as generated:
            for piece in generated:
                if stream.closed:  # its consumer is gone: closing `generated` stops the LM
                    return None
                stream._put(piece)
                pieces.append(piece)
        reply = "".join(pieces)
        remember(reply)
        return ChatReply(user_id, reply, loaded.version)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def loaded(self) -> int:
        return len(self._programs)

    def alignments(self) -> dict[str, int]:
        """Alignment jobs by status, for health checks."""
        with self._lock:
            statuses = [j.status for j in self._jobs.values()]
        return {status: statuses.count(status) for status in ("queued", "running")}

    # ------------------------------------------------------------------ memory and persona

    def add_interaction(self, user_id: str, input: str, output: str | None = None,
                        timestamp: float | None = None, metadata: dict | None = None) -> list[int]:
        """Append one interaction (its ground-truth `output` if known); creates the user if new.
        Returns the new record's id, or [] when the same interaction is already recorded."""
        self._valid(user_id)
        try:
            item = Interaction(input, output, time.time() if timestamp is None else timestamp, metadata or {})
            with self._user_lock(user_id):  # not while the user is being deleted
                ids = self.store.memory(user_id).add([item])
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if ids and output is not None:
            self._after_outcome(user_id)
        return ids

    def _after_outcome(self, user_id: str) -> None:
        """Online alignment: after every `align_every` new interactions with a known outcome, the
        user's persona is aligned in the background, one alignment per user at a time."""
        if not self.align_every:
            return
        with self._lock:
            outcomes = self._outcomes_since_alignment[user_id] = self._outcomes_since_alignment.get(user_id, 0) + 1
        if outcomes < self.align_every:
            return
        try:
            self.align(user_id, trigger=f"online: {outcomes} new interactions with known outcomes")
        except AlignmentRunning:
            return  # this user's alignment is still running: a later outcome starts the next one
        with self._lock:
            self._outcomes_since_alignment[user_id] = 0

    def persona(self, user_id: str) -> dict:
        """The persona in force, the instructions the program runs with, and the version history."""
        loaded = self._loaded(self._existing(user_id))
        program, state = loaded.program, loaded.state
        return {
            "user_id": user_id,
            "compiled": state is not None,
            "task": task_to_dict(program.task),
            "current_version": loaded.version,
            "persona": program.persona.to_dict(),
            "instructions": program.instructions_by_predictor(),
            "versions": state.versions if state else [],
            "interactions": len(program.memory),
        }

    def rollback(self, user_id: str, version: int) -> dict:
        """Make a kept version of the user's persona current again, as a new version; returns `persona`."""
        user_id = self._existing(user_id)
        try:
            state = self.store.rollback(user_id, version)
        except KeyError as exc:
            raise NotFound(str(exc.args[0])) from None
        if self.register_prompts:  # the restored version is the one in force: the alias moves to it
            tracker = Tracker(self.tracking_uri, "personaagent-align")
            PromptRegistry(tracker).publish(state, [state.current])
            self._forget_registered(user_id)
        return self.persona(user_id)

    def delete(self, user_id: str) -> None:
        """Forget the user completely: their runs in MLflow (with `tracking_uri`) first, then memory,
        profile, persona, versions and alignment jobs. If MLflow cannot be reached nothing is deleted
        and the caller is told to retry, so a user is never left half forgotten."""
        user_id = self._existing(user_id)
        if self.tracking_uri:
            try:
                forget_user(user_id, self.tracking_uri)
            except Exception as exc:
                raise Unavailable(f"the user's MLflow runs could not be deleted ({type(exc).__name__}); "
                                  "nothing was deleted, retry", self.lm_retry_after) from exc
        with self._user_lock(user_id):
            with self._lock:
                self._deletions[user_id] = self._deletions.get(user_id, 0) + 1
                self._programs.pop(user_id, None)
                self._pasts.forget(user_id)
                self._forget_registered(user_id)
                self._outcomes_since_alignment.pop(user_id, None)
                # A running alignment sees the deletion count change and does not save.
                self._jobs = {i: j for i, j in self._jobs.items() if j.user_id != user_id}
            self.store.delete_user(user_id)

    # ------------------------------------------------------------------ test-time alignment

    def align(self, user_id: str, n_recent: int = CompileConfig.n_recent, iterations: int = CompileConfig.iterations,
              acceptance: str = CompileConfig.acceptance, optimizer: str = CompileConfig.optimizer,
              trigger: str = "align request") -> AlignJob:
        """Start aligning the persona as a compile aligns it, on the latest `n_recent` interactions
        with a known answer, with these settings over the service's (`config`); returns at once with
        the job (see `job`). One alignment per user at a time."""
        user_id = self._existing(user_id)
        try:
            config = replace(self.config, n_recent=n_recent, iterations=iterations, acceptance=acceptance,
                             optimizer=optimizer)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not memory_replays(self._loaded(user_id).program.task, self.store.memory(user_id).all()):
            raise InvalidRequest("alignment needs at least one interaction with a known output to replay")
        with self._lock:
            running = next((j for j in self._jobs.values()
                            if j.user_id == user_id and j.status in ("queued", "running")), None)
            if running is not None:
                raise AlignmentRunning(running.id)
            job = AlignJob(uuid.uuid4().hex, user_id, n_recent, iterations, optimizer, trigger)
            self._jobs[job.id] = job
            deletions = self._deletions.get(user_id, 0)
        self._align_queue.put((job, config, deletions))
        return job

    def _population(self) -> PopulationModel | None:
        """The store's latest population model, if a compile fitted one."""
        saved = self.store.load_population()
        return PopulationModel.from_dict(saved["model"]) if saved else None

    def job(self, user_id: str, job_id: str) -> AlignJob:
        job = self._jobs.get(job_id)
        if job is None or job.user_id != user_id:
            raise NotFound(f"no alignment job {job_id!r} for user {user_id!r}")
        return job

    def _run_alignments(self) -> None:
        _single_threaded_search()
        while (item := self._align_queue.get()) is not None:
            self._run_align(*item)

    def _run_align(self, job: AlignJob, config: CompileConfig, deletions: int) -> None:
        """The compile's alignment (`pipeline.realign`, then `pipeline.save`) for one user, on the
        replays their memory gives now (`memory_replays`, as a compile's data gives them: read when the
        job runs, not when it was queued, so a user deleted in between is never replayed) and with the
        store's latest population model; the versions are recorded as made by `job.trigger`."""
        job.status = "running"
        try:
            if self._deletions.get(job.user_id, 0) != deletions:
                raise NotFound("the user was deleted before the alignment ran")
            loaded = self._loaded(job.user_id)
            task, previous = loaded.program.task, loaded.state
            user = UserData(job.user_id, replays=memory_replays(task, loaded.program.memory.all()))
            # Tracked like a compile, in a run tagged with the user (so forgetting finds it).
            tracker = Tracker(self.tracking_uri, "personaagent-align") if self.tracking_uri else None
            observer = MlflowObserver(tracker, self.register_prompts) if tracker else Observer()
            with (tracker.run(f"align {job.user_id}", {"user_id": job.user_id, "trigger": job.trigger})
                  if tracker else contextlib.nullcontext()), use_lm(self.lm), dspy.context(disable_history=True):
                aligned = pipeline.realign(self.store, user, task, config, previous, self.lm, observer,
                                           self._population(), self.reflection_lm)
                # The store's lock first (a compile in another process may hold it for minutes), then
                # this process's: appends of the user wait only for the save itself (observed after).
                with self.store.lock(job.user_id, create=False), self._user_lock(job.user_id):
                    if self._deletions.get(job.user_id, 0) != deletions:
                        raise NotFound("the user was deleted during alignment")
                    on_disk = self.store.load_state(job.user_id)
                    if (on_disk and on_disk.updated_at) != (previous and previous.updated_at):
                        raise RuntimeError("the program was recompiled during alignment; start the alignment again")
                    # What the program was compiled from and with stays: its compile's key and LM.
                    kept = replace(config, lm=previous.lm) if previous else config
                    state, added = pipeline.save(self.store, job.user_id, task, kept, previous, aligned,
                                                 previous.compile_key if previous else "", Observer(), job.trigger)
                observer.saved(state, added)  # registers the accepted versions, moving the alias
                self._forget_registered(job.user_id)
                observer.finished("succeeded", seconds_metrics(aligned.timings))
            job.new_versions = [v.version for v in added]
            job.current_version = state.current.version
            job.status = "succeeded"
        except Exception as exc:  # the job reports it; the service goes on
            if self._deletions.get(job.user_id, 0) != deletions:
                job.status, job.error = "cancelled", "the user was deleted"
            else:
                reason = ("the language model failed" if isinstance(exc, (LMError, AdapterParseError))
                          else type(exc).__name__)
                job.status, job.error = "failed", f"{reason}: {exc}"
        finally:
            job.finished_at = time.time()
            self._forget_old_jobs()

    def _forget_old_jobs(self, keep: int = 1000) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j.finished_at is not None]
            for j in sorted(finished, key=lambda j: j.finished_at)[:max(0, len(finished) - keep)]:
                del self._jobs[j.id]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Cancel queued answers and alignments, let running answers finish, then write the memory
        indexes. A running alignment is abandoned: it saves nothing (its version would be written
        only at its end), and its thread does not keep the process alive."""
        self._align_queue.put(None)
        self._lm_pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def __enter__(self) -> "PersonaService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
