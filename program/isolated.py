"""The embedded engine in a child process, so a native crash of llama.cpp never takes its caller down.

`IsolatedEngine` has the engine interface of `LlamaCppEngine` (`complete`, `score`, `stream`,
`close`) and forwards each call over a pipe to a child process that owns the llama.cpp context. A
stream comes back event by event as the child generates it; closing it early cancels the generation.
When the child dies (a segmentation fault, an illegal instruction, an abort), the call that was
running fails with `EngineCrashed` (DSPy reports it as an LM error: the service answers 503 with
`Retry-After`, a compile reports that user and goes on), a fresh child starts at once in the
background, and the next call waits for it. `state` says which: `ready`, `restarting`, `failed`.

Every child proves itself before it serves: it loads the model and runs one real decode
(`SELF_TEST_PROMPT`). A child that dies there fails with `EngineSelfTestFailed`, whose message is
one line: what failed, the CPU's relevant flags, the build's instruction sets, what to do.
`personaagent models prepare` runs that self-test.

The child ignores SIGINT and SIGTERM (its parent decides when it stops) and prints no Python fault
dump: a crash is reported once, by the parent.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Iterator

from .native_build import RELEVANT_FLAGS, cpu_flags, installed_build

SELF_TEST_PROMPT = "Reply with one word: ready?"
# For tests of crash isolation only: a child whose request contains this text aborts, as a native
# crash in llama.cpp would (read when the child starts).
ABORT_ON_ENV = "PERSONAAGENT_ENGINE_ABORT_ON"
START_TIMEOUT = 600.0  # seconds for a child to load its model and pass its self-test (a busy 2-core machine)


class EngineCrashed(RuntimeError):
    """The engine's process died while it held this call."""


class EngineSelfTestFailed(EngineCrashed):
    """A new engine died before it answered its first decode: this build cannot run here."""


def signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return f"exit status {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"
    return {"SIGILL": "SIGILL, an illegal instruction", "SIGSEGV": "SIGSEGV, a segmentation fault",
            "SIGABRT": "SIGABRT, an abort"}.get(name, name)


def build_features() -> str:
    """The instruction sets the installed llama.cpp was compiled with, as it reports them (`=1` only)."""
    import llama_cpp  # loading the library runs none of its kernels

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    enabled = [part.split("=")[0].split(":")[-1].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    return " ".join(enabled) or info.strip()


def crash_report(model_name: str, exitcode: int | None) -> str:
    """The one line a failed self-test prints."""
    flags = cpu_flags()
    relevant = " ".join(f for f in RELEVANT_FLAGS if f in flags) or "none reported"
    build = installed_build().get("tag") or "not built by program/native_build.py"
    return (f"the embedded model {model_name} crashed in its self-test ({signal_name(exitcode)}); "
            f"CPU flags: {relevant}; llama.cpp build: {build} ({build_features()}); "
            f"rebuild it for this CPU with `make engine` (or `python program/native_build.py install`), "
            f"or use a served LM with --lm openai/<model> --api-base URL")


def _serve(conn: Connection, model_name: str, options: dict) -> None:
    """The child (`python -m personaagent.program.isolated FD MODEL OPTIONS`: a fresh interpreter,
    which re-runs none of its parent's script): load the model, decode once, then answer requests
    until told to close."""
    faulthandler.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    abort_on = os.environ.get(ABORT_ON_ENV)

    def crash_if_asked(payload) -> None:
        if abort_on and abort_on in repr(payload):
            os.abort()

    from .lm import LlamaCppEngine

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    engine = LlamaCppEngine(model_name, **options)
    crash_if_asked(SELF_TEST_PROMPT)
    engine.self_test(SELF_TEST_PROMPT)
    conn.send(("ready", None))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:  # the parent is gone
            break
        if method == "close":
            break
        if method == "cancel":  # it came after its stream had ended
            continue
        crash_if_asked(args)
        try:
            if method == "stream":
                _send_stream(conn, engine.stream(*args))
            else:
                conn.send(("ok", getattr(engine, method)(*args)))
        except Exception as exc:  # an ordinary error is the caller's, as it would be in-process
            try:
                conn.send(("error", exc))
            except Exception:  # not picklable: its text is enough
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    engine.close()


def _send_stream(conn: Connection, events) -> None:
    """Each event as the engine makes it, then ("ok", None). Mid-stream the parent sends nothing but a
    cancel: it closes the engine's stream, which stops the generation at its next token."""
    with contextlib.closing(events):
        for event in events:
            if conn.poll():
                conn.recv()
                break
            conn.send(("event", event))
    conn.send(("ok", None))


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """A child whose parent was killed mid-request would otherwise finish the request (minutes on
    a long prompt) before its next read finds the pipe closed, holding a core nobody uses."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


class IsolatedEngine:
    """A `LlamaCppEngine` in a child process (see the module docstring). Calls are serialized: the
    child holds one llama.cpp context, which is not thread-safe."""

    supports_response_schema = True
    supported_params = frozenset({"temperature", "max_tokens", "top_p", "stop", "seed", "response_format"})

    def __init__(self, model_name: str, **options):
        self.model_name, self.options = model_name, options
        self._lock = threading.Lock()
        self._restarted = threading.Event()
        self._conn: Connection | None = None
        self._process = None
        self.crashes = 0
        self.state = "starting"
        self.last_crash = ""
        self._start()

    def _start(self) -> None:
        """A new child, ready once it has passed its self-test; raises `EngineSelfTestFailed` if it died."""
        ours, theirs = socket.socketpair()
        process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), self.model_name,
                                    json.dumps(self.options)], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()  # only the child holds its end: its death ends our reads
        conn = Connection(ours.detach())
        try:
            if not conn.poll(START_TIMEOUT):
                process.kill()
                raise EngineSelfTestFailed(f"the embedded model {self.model_name} did not start within "
                                           f"{START_TIMEOUT:g} s")
            conn.recv()
        except (EOFError, ConnectionResetError):
            conn.close()
            self.state = "failed"
            raise EngineSelfTestFailed(crash_report(self.model_name, process.wait(10))) from None
        self._conn, self._process, self.state = conn, process, "ready"

    def _restart_in_background(self) -> None:
        def restart() -> None:
            try:
                self._start()
            except EngineCrashed as exc:
                self.last_crash = str(exc)
            finally:
                self._restarted.set()

        self._restarted.clear()
        self.state = "restarting"
        threading.Thread(target=restart, name="personaagent-engine-restart", daemon=True).start()

    @contextlib.contextmanager
    def _child(self) -> Iterator[Connection]:
        """The child's connection, held for one call; a child that dies during the call makes it raise
        `EngineCrashed`, and a fresh child starts."""
        with self._lock:
            if self.state == "restarting":
                self._restarted.wait()
            if self._conn is None:  # the restart failed, or the engine was closed: start one now
                self._start()
            conn, process = self._conn, self._process
            try:
                yield conn
            except (EOFError, BrokenPipeError, ConnectionResetError):
                exitcode = process.wait(10)
                conn.close()
                if self.state == "closed":  # `close` stopped it: no restart
                    raise EngineCrashed(f"the LM engine ({self.model_name}) was closed during the call") from None
                self.crashes += 1
                self.last_crash = f"the LM engine ({self.model_name}) crashed: {signal_name(exitcode)}"
                self._conn = self._process = None
                self._restart_in_background()
                raise EngineCrashed(self.last_crash) from None

    def _call(self, method: str, *args):
        with self._child() as conn:
            conn.send((method, args))
            status, value = conn.recv()
        if status == "error":
            raise value
        return value

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def complete(self, request):
        return self._call("complete", request)

    def score(self, messages: list[dict], continuations: list[str]) -> tuple[list[float], int]:
        return self._call("score", messages, continuations)

    def stream(self, request) -> Iterator:
        """The reply's events as the child generates them (messages ("event", e)..., then the call's
        ("ok", None) or ("error", exc)). Closing the stream early sends the child ("cancel", ()), which
        stops the generation at its next token, and reads what the child sent meanwhile up to its end,
        so the next call starts in step. The child is held until then."""
        with self._child() as conn:
            conn.send(("stream", (request,)))
            try:
                while (message := conn.recv())[0] == "event":
                    yield message[1]
            except GeneratorExit:
                conn.send(("cancel", ()))
                while conn.recv()[0] == "event":
                    pass
                raise
        status, value = message
        if status == "error":
            raise value

    def close(self) -> None:
        """Stop the child: at once if it is busy (a running answer is cancelled), else when it has closed."""
        process, conn = self._process, self._conn
        self._conn = self._process = None
        self.state = "closed"
        if process is None:
            return
        if self._lock.acquire(blocking=False):
            try:
                conn.send(("close", ()))
                process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                self._lock.release()
        if process.poll() is None:
            process.kill()
            process.wait(10)
        conn.close()


def self_test(model_name: str) -> None:
    """Start the model's engine in a child process, decode once, and stop it; raises
    `EngineSelfTestFailed` with one line if the child dies."""
    IsolatedEngine(model_name).close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3]))

