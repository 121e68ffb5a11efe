"""Personalized memory of one user.

Episodic memory: an append-only SQLite log of the user's interactions (the source of truth, with
each record's embedding) and a FAISS index over it whose ids are the log's row ids. The index is
a cache: it is rebuilt from the log whenever it is missing or stale, so a crash between the two
writes loses nothing. A full-text index (SQLite FTS5) lives in the log's database, kept by
triggers in the same transactions. Search takes the two in turns. Each user has their own files,
so a search can only ever return that user's records.

Semantic memory: an LLM-written profile of the user (summary and stable preferences), updated
incrementally as interactions arrive.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import logging
import re
import sqlite3
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import dspy
import faiss
import numpy as np

from ..data.tasks import Interaction, TaskSpec
from .embedder import Embedder, MiniLMEmbedder
from .storage import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

# Exact search up to this size; above it an inverted-file index keeps search well under a millisecond.
IVF_THRESHOLD = 20_000
MAX_QUERY_TERMS = 16
# Full-text ranking scores every record holding a query word: a few milliseconds up to this size,
# tens to hundreds above it (experiments/results/memory), so larger memories search by embedding only.
LEXICAL_MAX_RECORDS = 5_000


@dataclass(frozen=True)
class MemoryRecord:
    id: int
    input: str
    output: str | None
    timestamp: float | None
    metadata: dict
    score: float = 0.0
    key: str = ""

    def render(self, width: int = 240) -> str:
        """The record for a prompt, input and answer each cut to `width` characters (a paper's
        answer is its reference list: twenty titles)."""
        text = self.input if len(self.input) <= width else self.input[:width] + "..."
        output = self.output if self.output is None or len(self.output) <= width else self.output[:width] + "..."
        return f"{text}\n  -> the user's answer: {output}" if output else text


@dataclass(frozen=True)
class Cutoff:
    """The moment an interaction happened, for replaying it: memory then shows only records
    strictly before its time (or, without times, added before it), and never the interaction's own
    record. `key` is the identity of its record in memory (`Interaction.key`), `timestamp` its time."""

    key: str | None = None
    timestamp: float | None = None

    @classmethod
    def of(cls, item: Interaction | MemoryRecord) -> "Cutoff":
        return cls(item.key, item.timestamp)


# Records visible at a cutoff: strictly earlier in time; without a time on either side, added earlier.
_VISIBLE = ("key IS NOT :key AND ((:ts IS NOT NULL AND timestamp IS NOT NULL AND timestamp < :ts)"
            " OR ((:ts IS NULL OR timestamp IS NULL) AND id < :id))")
_RECORD_COLUMNS = "id, input, output, timestamp, metadata, key"  # what `_record` reads


def _record(row: tuple) -> MemoryRecord:
    """A `records` row (`_RECORD_COLUMNS`) as a record."""
    return MemoryRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), key=row[5])


class EpisodicMemory:
    """One user's interactions: `add`, `search`, `delete`; thread-safe.

    `as_of(cutoff)` limits what is visible to what came before an interaction, so replaying it
    never sees its own record or a later one in memory.
    """

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        input TEXT NOT NULL, output TEXT, timestamp REAL, metadata TEXT NOT NULL,
        embedding BLOB NOT NULL, added_at REAL NOT NULL, key TEXT NOT NULL UNIQUE);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE VIRTUAL TABLE IF NOT EXISTS records_text USING fts5(input, content='records', content_rowid='id');
    CREATE TRIGGER IF NOT EXISTS records_text_add AFTER INSERT ON records BEGIN
        INSERT INTO records_text (rowid, input) VALUES (new.id, new.input); END;
    CREATE TRIGGER IF NOT EXISTS records_text_delete AFTER DELETE ON records BEGIN
        INSERT INTO records_text (records_text, rowid, input) VALUES ('delete', old.id, old.input); END;
    """

    def __init__(self, directory: Path, embedder: Embedder):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self._lock = threading.RLock()
        self._closed = False
        self._db = sqlite3.connect(self.directory / "episodic.sqlite", check_same_thread=False, isolation_level=None)
        # Closed with the memory (the store drops unused ones), not at some later garbage collection:
        # a connection sits in a reference cycle with its statement cache.
        weakref.finalize(self, self._db.close)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(self.SCHEMA)
        self._index_text_of_older_logs()
        self._index_path = self.directory / "episodic.faiss"
        self._adopt_log()
        self._index, self._index_version = self._load_or_rebuild_index()
        self._seen = self._version()  # the log version the index in memory reflects
        self._cutoff: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cutoff", default=None)
        self._last_query: tuple[str, np.ndarray] | None = None

    def __deepcopy__(self, memo):
        # A handle on the user's stored memory: copies of a program (optimizers deepcopy the
        # student) share it rather than cloning a database connection.
        return self

    # -------------------------------------------------------------- index upkeep

    def _version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        return int(row[0]) if row else 0

    def _bump_version(self) -> None:
        self._db.execute(
            "INSERT INTO meta VALUES ('version', '1') ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def _index_text_of_older_logs(self) -> None:
        """Logs written before the full-text index existed get it built once."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM meta WHERE key='text_index'").fetchone() is None:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO records_text (records_text) VALUES ('rebuild')")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('text_index', '1')")
                self._db.execute("COMMIT")

    def _recorded_embedder(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
        return row[0] if row else None

    def _adopt_log(self) -> None:
        """Makes the log's vectors this embedder's (`_reembed_log`); one read when they already are."""
        with self._lock:
            recorded = self._recorded_embedder()
            if recorded == self.embedder.name:
                return
            recorded = recorded or MiniLMEmbedder.name
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._reembed_log()
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:  # a read-only store, say: its vectors stay unsearchable here
                raise RuntimeError(f"memory {self.directory}: embedded with {recorded}, this process embeds with "
                                   f"{self.embedder.name} and cannot re-embed it ({exc})") from exc

    def _reembed_log(self) -> None:
        """Inside a write transaction. Vectors of two models never meet in one search: a log
        embedded by another model (another process may have re-embedded it since) is re-embedded
        by this one from its texts, the log's source of truth; the index follows its version."""
        recorded = self._recorded_embedder()
        if recorded == self.embedder.name:
            return
        recorded = recorded or MiniLMEmbedder.name  # logs from before the name was recorded hold MiniLM's
        rows = self._db.execute("SELECT id, input FROM records ORDER BY id").fetchall()
        if rows and recorded != self.embedder.name:  # a log with no name that is this embedder's: only name it
            log.warning("memory %s: embedded with %s, opened with %s: re-embedding its %d records from the log",
                        self.directory, recorded, self.embedder.name, len(rows))
            vectors = self.embedder.embed([r[1] for r in rows])
            self._db.executemany("UPDATE records SET embedding = ? WHERE id = ?",
                                 [(v.tobytes(), r[0]) for r, v in zip(rows, vectors)])
            self._bump_version()
        self._db.execute("INSERT INTO meta VALUES ('embedder', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (self.embedder.name,))

    def _load_or_rebuild_index(self):
        version = self._version()
        stamp = self._index_path.with_suffix(".version")
        if self._index_path.exists() and stamp.exists() and stamp.read_text().strip() == str(version):
            return faiss.read_index(str(self._index_path)), version
        return self._rebuild(), -1  # -1: the file on disk is stale until the next flush

    def _rebuild(self) -> faiss.Index:
        self._adopt_log()
        rows = self._db.execute("SELECT id, embedding FROM records ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, self.embedder.dim)
        return self._new_index(vectors, ids)

    def _new_index(self, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
        dim = self.embedder.dim
        if len(ids) < IVF_THRESHOLD:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            nlist = int(4 * np.sqrt(len(ids)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = 16
            index = faiss.IndexIDMap2(index)
        if len(ids):
            index.add_with_ids(vectors, ids)
        return index

    def _sync(self) -> None:
        """Another process (a compile, a second server) may have changed the log: rebuild then."""
        version = self._version()
        if version != self._seen:
            self._index, self._seen, self._index_version = self._rebuild(), version, -1

    def flush(self) -> None:
        """Write the index beside the log; until then a reopened memory rebuilds it from the log."""
        with self._lock:
            if self._closed:  # the store may flush a memory that was deleted meanwhile
                return
            self._sync()
            version = self._version()
            if self._index_version == version:
                return
            with atomic_path(self._index_path) as tmp:
                faiss.write_index(self._index, str(tmp))
            with atomic_path(self._index_path.with_suffix(".version")) as tmp:
                tmp.write_text(str(version))
            self._index_version = version

    # -------------------------------------------------------------- the API

    def add(self, interactions: list[Interaction]) -> list[int]:
        """Append interactions (embedding their text, no LLM call); returns the ids of the new records.

        Interactions already in the log (same input, output and timestamp) are skipped.
        """
        for i, item in enumerate(interactions):
            if not isinstance(item.input, str) or not item.input.strip():
                raise ValueError(f"interaction {i}: 'input' must be a non-empty string")
        keyed = {item.key: item for item in interactions}
        with self._lock:
            known = self._known_keys(list(keyed))
        fresh = [(k, item) for k, item in keyed.items() if k not in known]
        if not fresh:
            return []
        vectors = self._embed([item.input for _, item in fresh])
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._reembed_log()  # the new vectors join only vectors of the same model
                before = self._version()
                ids, added = [], []
                for (key, item), vector in zip(fresh, vectors):
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO records (input, output, timestamp, metadata, embedding, added_at, key)"
                        " VALUES (?,?,?,?,?,?,?)",
                        (item.input, item.output, item.timestamp, json.dumps(item.metadata or {}), vector.tobytes(),
                         now, key),
                    )
                    if cur.rowcount:  # another writer may have added the same interaction meanwhile
                        ids.append(cur.lastrowid)
                        added.append(vector)
                self._bump_version()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            stale = before != self._seen
            self._seen, self._index_version = before + 1, -1
            if not ids:
                return []
            total = self._index.ntotal + len(ids)
            flat = isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat)
            if stale or (flat and total >= IVF_THRESHOLD):
                self._index = self._rebuild()
            else:
                self._index.add_with_ids(np.stack(added), np.array(ids, dtype=np.int64))
        return ids

    def _known_keys(self, keys: list[str]) -> set[str]:
        known = set()
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            known.update(r[0] for r in self._db.execute(f"SELECT key FROM records WHERE key IN ({marks})", chunk))
        return known

    @contextlib.contextmanager
    def as_of(self, cutoff: Cutoff | None):
        """Within the block, only the records before `cutoff` are visible (None: all)."""
        params = None
        if cutoff is not None:
            with self._lock:
                own = self._db.execute("SELECT id, timestamp FROM records WHERE key = ?", (cutoff.key,)).fetchone()
            if own is None and cutoff.timestamp is None:
                raise ValueError("cannot tell what came before an interaction with no record in memory and no time")
            # Not in memory: placed by its time; where it falls among records without a time is
            # unknown, so those are hidden.
            params = {"key": cutoff.key, "ts": cutoff.timestamp if cutoff.timestamp is not None else own[1],
                      "id": own[0] if own else 0}
        token = self._cutoff.set(params)
        try:
            yield self
        finally:
            self._cutoff.reset(token)

    def _visible(self) -> tuple[str, dict]:
        """The SQL condition on `records` of what is visible now (see `as_of`), and its parameters."""
        params = self._cutoff.get()
        return (_VISIBLE, params) if params is not None else ("1", {})

    def search(self, query: str, k: int = 4) -> list[MemoryRecord]:
        """Hybrid search: the embedding's neighbours and the full-text (BM25) matches, taken in
        turns (dense first). Either alone misses what the other finds: embeddings miss rare names
        and exact terms, words miss paraphrases. Taking turns, unlike rank fusion, keeps each one's
        best hits even when the other does not rank them at all (a serial number, a name). Above
        LEXICAL_MAX_RECORDS records, embeddings alone keep search under a millisecond."""
        if k <= 0:
            return []
        dense = self.search_vector(self._query_vector(query), k)
        lexical = self.search_text(query, k) if self._index.ntotal <= LEXICAL_MAX_RECORDS else []
        found: dict[int, MemoryRecord] = {}
        for pair in itertools.zip_longest(dense, lexical):
            for record in pair:
                if record is not None and record.id not in found:
                    found[record.id] = record
        return list(found.values())[:k]

    def _query_vector(self, query: str) -> np.ndarray:
        """The query's embedding. The last one is kept: an answer searches its question twice (the
        context it is shown, and its tools' evidence), a chat turn is remembered after its message
        was searched, and embedding is most of a search's cost."""
        with self._lock:
            if self._last_query is not None and self._last_query[0] == query:
                return self._last_query[1]
        vector = self.embedder.embed([query])[0]
        with self._lock:
            self._last_query = (query, vector)
        return vector

    def _embed(self, texts: list[str]) -> np.ndarray:
        """The texts' embeddings; one text that was the last query reuses its kept vector."""
        with self._lock:
            last = self._last_query
        if last is not None and len(texts) == 1 and texts[0] == last[0]:
            return last[1][None, :]
        return self.embedder.embed(texts)

    def search_text(self, query: str, k: int = 4) -> list[MemoryRecord]:
        """Full-text search (SQLite FTS5, BM25 ranking): records with any of the query's words."""
        # The longest words: they are the rarer ones, and a bounded query keeps a long question
        # (a whole review) fast.
        words = sorted(set(re.findall(r"\w+", query.lower())), key=lambda w: (-len(w), w))[:MAX_QUERY_TERMS]
        if not words or k <= 0:
            return []
        condition, params = self._visible()
        with self._lock:
            # `+rowid`: a bare `rowid IN (...)` is handed to FTS5, which then runs the whole match
            # once per visible record (about a second for 650 records, against 3 ms).
            ids = [r[0] for r in self._db.execute(
                "SELECT rowid FROM records_text WHERE records_text MATCH :match"
                f" AND +rowid IN (SELECT id FROM records WHERE {condition}) ORDER BY rank LIMIT :k",
                {**params, "match": " OR ".join(f'"{w}"' for w in words), "k": k})]
            rows = self._fetch(ids)
        return [rows[i] for i in ids if i in rows]

    def search_vector(self, vector: np.ndarray, k: int = 4) -> list[MemoryRecord]:
        condition, visible = self._visible()
        with self._lock:
            self._sync()
            if self._index.ntotal == 0 or k <= 0:
                return []
            params = None
            if visible:
                ids = np.array([r[0] for r in self._db.execute(f"SELECT id FROM records WHERE {condition}", visible)],
                               dtype=np.int64)
                if len(ids) == 0:
                    return []
                selector = faiss.IDSelectorBatch(ids)
                inner = faiss.downcast_index(self._index.index)
                params = (faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
                          if isinstance(inner, faiss.IndexIVF) else faiss.SearchParameters(sel=selector))
            scores, ids = self._index.search(vector.reshape(1, -1).astype(np.float32), min(k, self._index.ntotal),
                                             params=params)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            rows = self._fetch([i for i, _ in found])
        return [replace(rows[i], score=s) for i, s in found if i in rows]

    def _fetch(self, ids: list[int]) -> dict[int, MemoryRecord]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE id IN ({marks})", ids
        ).fetchall()
        return {r[0]: _record(r) for r in rows}

    def all(self) -> list[MemoryRecord]:
        condition, params = self._visible()
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE {condition} ORDER BY id", params
            ).fetchall()
        return [_record(r) for r in rows]

    def with_input(self, text: str) -> list[MemoryRecord]:
        """The records of the interactions whose input is exactly `text`, newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_RECORD_COLUMNS} FROM records WHERE input = ? ORDER BY id DESC",
                                    (text,)).fetchall()
        return [_record(r) for r in rows]

    def recent(self, n: int) -> list[MemoryRecord]:
        return self.all()[-n:] if n > 0 else []

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def delete(self, record_id: int) -> bool:
        with self._lock:
            self._sync()
            cur = self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
            if cur.rowcount:
                self._bump_version()
                self._index.remove_ids(np.array([record_id], dtype=np.int64))
                self._seen, self._index_version = self._seen + 1, -1
            return bool(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self.flush()
            self.drop()

    def drop(self) -> None:
        """Close without writing anything: the user's files are about to be removed."""
        with self._lock:
            self._closed = True
            self._db.close()


# ------------------------------------------------------------------ semantic memory

class SummarizeUser(dspy.Signature):
    """Update a concise profile of one user from their recent interactions. Write only what the
    interactions and the computed facts support: stable preferences, topics, style, and how this
    user tends to answer. Keep what the previous profile got right; never copy interactions verbatim."""

    task: str = dspy.InputField(desc="what the user does in these interactions")
    facts: str = dspy.InputField(desc="statistics computed from the user's whole history")
    previous_profile: str = dspy.InputField(desc="the profile so far (empty for a new user)")
    interactions: str = dspy.InputField(desc="recent interactions with the user's own answers")
    summary: str = dspy.OutputField(desc="2-4 sentences about this user")
    preferences: list[str] = dspy.OutputField(desc="3-6 short, concrete preferences or habits")


@dataclass
class Profile:
    summary: str = ""
    preferences: list[str] = field(default_factory=list)
    covered: int = 0  # how many of the user's records the profile has read
    updated_at: float = 0.0

    def render(self) -> str:
        if not self.summary and not self.preferences:
            return "No profile yet."
        return self.summary + "".join(f"\n- {p}" for p in self.preferences)


class SemanticMemory(dspy.Module):
    """Writes and updates the user's profile: one LM call per update, over the records not yet read."""

    def __init__(self, max_items: int = 6, width: int = 160):
        super().__init__()
        self.summarize = dspy.Predict(SummarizeUser)
        self.max_items = max_items
        self.width = width

    def forward(self, task: TaskSpec, records: list[MemoryRecord], previous: Profile) -> dspy.Prediction:
        """Returns `Prediction(profile=...)`: the previous profile when no record is new."""
        new = records[previous.covered:][-self.max_items:]
        if not new:
            return dspy.Prediction(profile=previous)
        facts = task.output_stats([r.output for r in records])
        out = self.summarize(
            task=task.description,
            facts=facts,
            previous_profile=previous.render() if previous.covered else "",
            interactions="\n".join(f"- {r.render(self.width)}" for r in new),
        )
        profile = Profile(out.summary.strip(), [p.strip() for p in out.preferences if p.strip()][:6], len(records),
                          time.time())
        return dspy.Prediction(profile=profile)


def load_profile(path: Path) -> Profile:
    return Profile(**json.loads(path.read_text())) if path.exists() else Profile()


def save_profile(path: Path, profile: Profile) -> None:
    write_json_atomic(path, asdict(profile))
