"""The store: one directory per user holding their memory, profile and compiled program.

    <root>/users/<user_id>/episodic.sqlite, episodic.faiss   episodic memory
    <root>/users/<user_id>/profile.json                      semantic memory
    <root>/users/<user_id>/program.json                      persona, its versions, task, LM
    <root>/users/<user_id>/stages.json                       the last compile's stages: inputs' keys, outputs
    <root>/population/vNNN.json                              the population model's versions (no user's data)

Every file is written atomically, and `program.json` carries a format version, so a crash while
saving leaves the previous program loadable and an old file is never misread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data.tasks import TaskSpec, task_from_dict
from .agent import PersonaProgram
from .embedder import Embedder, default_embedder
from .memory import EpisodicMemory, Profile, load_profile, save_profile
from .persona import Persona, PersonaVersion
from .storage import MAX_VERSIONS, validate_user_id, write_json_atomic

FORMAT_VERSION = 1


@dataclass
class ProgramState:
    """What is saved of a user's program; the persona in force is the last accepted version."""

    user_id: str
    task: dict
    lm: str
    versions: list[PersonaVersion]
    compile_key: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @property
    def current(self) -> PersonaVersion:
        return next(v for v in reversed(self.versions) if v.accepted)

    @property
    def next_version(self) -> int:
        return self.versions[-1].version + 1 if self.versions else 1

    @classmethod
    def continuing(cls, previous: "ProgramState | None", user_id: str, task: dict, lm: str,
                   compile_key: str = "") -> "ProgramState":
        """A state to record new versions into: `previous`'s history, copied (or none)."""
        return cls(user_id, task, lm, list(previous.versions) if previous else [], compile_key,
                   created_at=previous.created_at if previous else time.time())

    def record(self, ran: list[PersonaVersion], trigger: str) -> list[PersonaVersion]:
        """The one path by which versions enter the history: the states an optimizer ran (the one
        it started from first), numbered after the last kept version, with what triggered them.
        The starting state is new only to a program without versions. Returns those added."""
        added = [replace(v, version=self.next_version + i, trigger=trigger)
                 for i, v in enumerate(ran if not self.versions else ran[1:])]
        self.versions.extend(added)
        return added

    def kept(self, max_versions: int) -> list[PersonaVersion]:
        """At most `max_versions` of the versions: always the initial one, the best validated one
        and the one in force, then the latest. Numbers are never reused."""
        if len(self.versions) <= max_versions:
            return self.versions
        scored = [v for v in self.versions if v.accepted and v.score is not None]
        best = max(scored, key=lambda v: (v.score, v.likelihood or float("-inf")), default=self.current)
        keep = {self.versions[0].version, best.version, self.current.version}
        for v in reversed(self.versions):
            if len(keep) >= max_versions:
                break
            keep.add(v.version)
        return [v for v in self.versions if v.version in keep]

    def rollback(self, version: int) -> PersonaVersion:
        """Make a kept version current again, as a new version (history only grows)."""
        target = next((v for v in self.versions if v.version == version), None)
        if target is None:
            raise KeyError(f"version {version} of user {self.user_id!r} is not kept "
                           f"(kept: {', '.join(str(v.version) for v in self.versions)})")
        restored = replace(target, version=self.next_version, feedback="", accepted=True,
                           note=f"rollback to v{version}", created_at=time.time(), trigger="rollback")
        self.versions.append(restored)
        return restored

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict, source: str = "") -> "ProgramState":
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: program format version {version!r}, this PersonaAgent reads {FORMAT_VERSION}")
        payload = dict(payload)
        payload["versions"] = [PersonaVersion.from_dict(v) for v in payload["versions"]]
        return cls(**payload)


class UserStore:
    """Users' memories, profiles and programs under one directory; safe to share between threads."""

    def __init__(self, root: str | Path, embedder: Embedder | None = None, max_open: int = 256,
                 max_versions: int = MAX_VERSIONS):
        if max_versions < 3:
            raise ValueError("max_versions must be at least 3 (the initial, the best and the current version)")
        self.max_versions = max_versions
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"store {self.root}: is a file, not a directory")
        (self.root / "users").mkdir(parents=True, exist_ok=True)
        self._embedder = embedder
        self.max_open = max_open
        # Every memory in use, one object per user (a weak reference: it closes when unused), and
        # the most recently used ones kept open, so a server with many users holds a bounded
        # number of databases and indexes while a loaded program never sees its memory closed.
        self._memories: weakref.WeakValueDictionary[str, EpisodicMemory] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[str, EpisodicMemory] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def user_dir(self, user_id: str) -> Path:
        return self.root / "users" / validate_user_id(user_id)

    def users(self) -> list[str]:
        """Users with a compiled program."""
        return sorted(p.parent.name for p in (self.root / "users").glob("*/program.json"))

    def memory(self, user_id: str) -> EpisodicMemory:
        """The user's memory; of those nothing else holds, the `max_open` most recently used stay open."""
        with self._lock:
            memory = self._memories.get(user_id)
            if memory is None:
                memory = self._memories[user_id] = EpisodicMemory(self.user_dir(user_id), self.embedder)
            self._recent[user_id] = memory
            self._recent.move_to_end(user_id)
            evicted = self._recent.popitem(last=False)[1] if len(self._recent) > self.max_open else None
        if evicted is not None:
            evicted.flush()  # written now, the index need not be rebuilt when the user comes back
        return memory

    @contextlib.contextmanager
    def lock(self, user_id: str, create: bool = True):
        """Exclusive, across processes, while held: compiles and alignments of one user that would
        each save a new version take turns, so neither overwrites the other's. Blocks until free.
        With `create=False` a user without a directory (deleted) is a FileNotFoundError, not recreated."""
        directory = self.user_dir(user_id)
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def unwritable(self) -> str | None:
        """Why nothing can be saved in the store now (None: a file can be written, as SQLite needs
        even to read a memory)."""
        try:
            with tempfile.NamedTemporaryFile(dir=self.root / "users", prefix=".probe"):
                return None
        except OSError as exc:
            return f"the store {self.root} is not writable ({exc.strerror or type(exc).__name__})"

    def profile(self, user_id: str) -> Profile:
        return load_profile(self.user_dir(user_id) / "profile.json")

    def save_profile(self, user_id: str, profile: Profile) -> None:
        save_profile(self.user_dir(user_id) / "profile.json", profile)

    def stage_log(self, user_id: str) -> dict:
        """What each stage of the user's last compile ran on and gave (see `optimizers.pipeline`)."""
        path = self.user_dir(user_id) / "stages.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def save_stage_log(self, user_id: str, log: dict) -> None:
        write_json_atomic(self.user_dir(user_id) / "stages.json", log)

    def save_population(self, model: dict) -> int:
        """Record the population model (`optimizers.population`) as a new version unless it equals
        the latest; returns the version in force."""
        latest = self.load_population()
        if latest is not None and latest["model"] == model:
            return latest["version"]
        version = latest["version"] + 1 if latest else 1
        write_json_atomic(self.root / "population" / f"v{version:03d}.json",
                          {"version": version, "created_at": time.time(), "model": model})
        return version

    def load_population(self) -> dict | None:
        """The latest population model version (`{"version", "created_at", "model"}`), or None."""
        versions = sorted((self.root / "population").glob("v*.json"))
        return json.loads(versions[-1].read_text(encoding="utf-8")) if versions else None

    def program_path(self, user_id: str) -> Path:
        return self.user_dir(user_id) / "program.json"

    def load_state(self, user_id: str) -> ProgramState | None:
        path = self.program_path(user_id)
        if not path.exists():
            return None
        return ProgramState.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))

    def save_state(self, state: ProgramState) -> None:
        """The one path a program is saved by: its history bounded to `max_versions`, atomically."""
        state.versions = state.kept(self.max_versions)
        state.updated_at = time.time()
        write_json_atomic(self.program_path(state.user_id), state.to_dict())

    def rollback(self, user_id: str, version: int) -> ProgramState:
        """Make a kept version of the user's persona current again, as a new version."""
        with self.lock(user_id, create=False):
            state = self.load_state(user_id)
            if state is None:
                raise KeyError(f"no compiled program for user {user_id!r} in {self.root}")
            state.rollback(version)
            self.save_state(state)
        return state

    def build(self, user_id: str, task: TaskSpec, persona: Persona | None = None, method: str = "persona",
              k: int = 4) -> PersonaProgram:
        memory, profile = self.memory(user_id), self.profile(user_id)
        return PersonaProgram(task, memory, profile, persona, method, k)

    def restore(self, user_id: str, task: TaskSpec, version: PersonaVersion, method: str = "persona") -> PersonaProgram:
        """The user's program as `version` saved it: the one way a saved program is restored (the
        compile's and the service's alike), with its persona and, for a method that follows the
        persona, the instructions compiled for it (`PersonaProgram.load_version`)."""
        program = self.build(user_id, task, method=method)
        program.load_version(version)
        return program

    def load_program(self, user_id: str, method: str = "persona") -> PersonaProgram:
        """The user's compiled program, with the persona in force."""
        state = self.load_state(user_id)
        if state is None:
            raise KeyError(f"no compiled program for user {user_id!r} in {self.root}")
        return self.restore(user_id, task_from_dict(state.task), state.current, method)

    def delete_user(self, user_id: str) -> bool:
        """Forget the user completely: memory, profile, persona and its versions."""
        directory = self.user_dir(user_id)
        with self._lock:
            memory = self._memories.pop(user_id, None)
            self._recent.pop(user_id, None)
        if memory is not None:
            memory.drop()
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True

    def close(self) -> None:
        with self._lock:
            for memory in list(self._memories.values()):
                memory.close()
            self._memories.clear()
            self._recent.clear()
