"""Loaders: LaMP files (official or LaMP-format) and generic JSONL interaction logs, into per-user
data, `datasets.Dataset`s and `dspy.Example`s.

Every loader returns a `TaskData`: the task spec and, per user, what goes to memory, the past
items that can be replayed for alignment, and the held-out questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator

import dspy

from .tasks import Interaction, Kind, TaskSpec, generic_task, resolve_task


class DataError(ValueError):
    """A malformed input file; the message names the file, the record and the field."""

    def __init__(self, path: Path | str, record: Any, problem: str):
        super().__init__(f"{path}: record {record}: {problem}")


@dataclass
class UserData:
    user_id: str
    memories: list[Interaction] = field(default_factory=list)  # everything the user did, oldest first
    replays: list[Interaction] = field(default_factory=list)  # past items phrased as task questions
    questions: list[dspy.Example] = field(default_factory=list)  # held-out: id, question, answer

    def recent(self, n: int) -> list[Interaction]:
        """The user's latest n replayable interactions (the paper's test-time alignment window)."""
        return self.replays[-n:] if n > 0 else []

    def to_row(self) -> dict:
        """The user as one row of `TaskData.dataset`."""
        return {"user_id": self.user_id, "memories": [_interaction_row(m) for m in self.memories],
                "replays": [_interaction_row(r) for r in self.replays],
                "questions": [{"id": str(q.get("id", "")), "question": q.question, "answer": q.get("answer")}
                              for q in self.questions]}

    @classmethod
    def from_row(cls, row: dict) -> "UserData":
        return cls(row["user_id"], [_interaction(m) for m in row["memories"]],
                   [_interaction(r) for r in row["replays"]],
                   [_example(q["id"], q["question"], q["answer"]) for q in row["questions"]])


@dataclass
class TaskData:
    task: TaskSpec
    users: dict[str, UserData]
    source: str = ""

    def select(self, n_users: int | None = None, user_ids: Iterable[str] | None = None) -> "TaskData":
        """Users chosen deterministically: the named ones, else the first n in file order."""
        if user_ids:
            missing = [u for u in user_ids if u not in self.users]
            if missing:
                raise KeyError(f"users not in {self.source}: {', '.join(map(repr, missing))}")
            chosen = list(user_ids)
        else:
            chosen = list(self.users)[: n_users or None]
        return TaskData(self.task, {u: self.users[u] for u in chosen}, self.source)

    @cached_property
    def dataset(self):
        """The users as a `datasets.Dataset`, one row per user (`UserData.to_row`): what the compile,
        its engines and `eval` consume, and what a cluster ships to its workers."""
        import datasets

        return datasets.Dataset.from_list([user.to_row() for user in self.users.values()])


def _interaction_row(item: Interaction) -> dict:
    # Metadata differ between records (a LaMP item's id, a replay's memory key): JSON, not a struct column.
    return {"input": item.input, "output": item.output, "timestamp": item.timestamp,
            "metadata": json.dumps(item.metadata, ensure_ascii=False)}


def _interaction(row: dict) -> Interaction:
    return Interaction(row["input"], row["output"], row["timestamp"], json.loads(row["metadata"]))


def memory_replays(spec: TaskSpec, records: list) -> list[Interaction]:
    """A user's replayable interactions from their memory records, oldest first (`UserData.memories`,
    or a store's `EpisodicMemory.all()`: the compile and the service replay the same), each tagged
    with the identity of its record and its time: when it is replayed, memory hides that record and
    everything not strictly before it. A record made from an item (`TaskSpec.from_memory`) replays as
    the task converts that item; one added as it is, a question and the user's answer, as it is."""
    items = [spec.from_memory(r) for r in records]
    found = []
    for position, (item, record) in enumerate(zip(items, records)):
        if item is None:
            replay = Interaction(record.input, record.output, metadata=record.metadata) if record.output else None
        else:
            replay = spec.to_interaction(item, [i for i in items[:position] + items[position + 1:] if i is not None])
        if replay is not None:
            found.append(replace(replay, timestamp=record.timestamp,
                                 metadata={**replay.metadata, "memory_key": record.key}))
    return found


def _example(qid: str, question: str, answer: str | None) -> dspy.Example:
    return dspy.Example(id=qid, question=question, answer=answer).with_inputs("question")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"at line {exc.lineno}", f"not valid JSON ({exc.msg})") from None


# ---------------------------------------------------------------- LaMP

def _lamp_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        questions = path
        outputs = path.with_name(path.name.replace("questions", "outputs"))
        return questions, outputs if outputs != path and outputs.exists() else None
    for pattern in ("questions.json", "*_questions.json", "*questions*.json"):
        found = sorted(path.glob(pattern))
        if found:
            return _lamp_files(found[0])
    raise FileNotFoundError(f"{path}: no LaMP questions file (questions.json or *_questions.json)")


def _infer_lamp_task(name: str | None, questions: list[dict], questions_path: Path,
                     outputs_path: Path | None) -> TaskSpec:
    if name and re.fullmatch(r"lamp[-_ ]?2(?:[-_].*)?", name.strip().lower()):
        # Official LaMP-2 files say 'LaMP_2' for both variants: the profile fields tell them apart.
        fields = {k for q in questions[:5] for p in q.get("profile", [])[:3] if isinstance(p, dict) for k in p}
        name = "LaMP-2M" if "tag" in fields else "LaMP-2N"
    if not name:
        if outputs_path is None:
            expected = questions_path.with_name(questions_path.name.replace("questions", "outputs"))
            raise ValueError(f"{questions_path}: no outputs file beside it ({expected.name}) to name the task: "
                             "add it, or pass --task (e.g. LaMP-3)")
        raise ValueError(f"{outputs_path}: the task is not named in it: pass --task (e.g. LaMP-3)")
    return resolve_task(name)


def _is_asked(spec: TaskSpec, item: dict, questions: list[str]) -> bool:
    """A profile item that is one of the user's own questions (same content) must not be memory."""
    contents = [str(item[f]) for f in spec.content_fields if len(str(item.get(f) or "")) > 20]
    return any(c in q for c in contents for q in questions)


def _labels_in_question(question: str) -> tuple[str, ...] | None:
    """LaMP-format classification questions list their labels: 'categories: [a, b, ...]'."""
    match = re.search(r"(?:categories|tags): \[([^\]]+)\]", question)
    return tuple(x.strip() for x in match.group(1).split(",")) if match else None


def load_lamp(path: str | Path, task: str | None = None) -> TaskData:
    """Read LaMP files unchanged: `questions.json` (+ `outputs.json`) or `X_questions.json` (+ `X_outputs.json`).

    Official LaMP has one profile per question; LaMP-format sets add `user_id` so a user's questions
    share a profile. A user's memory is the union of their questions' profiles less any item that
    is one of their questions, so no question's answer is ever in the memory used to answer it.
    """
    questions_path, outputs_path = _lamp_files(Path(path))
    questions = _read_json(questions_path)
    if not isinstance(questions, list):
        raise DataError(questions_path, "(top level)", "expected a list of questions")
    golds: dict[str, str] = {}
    file_task = None
    if outputs_path:
        outputs = _read_json(outputs_path)
        if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
            raise DataError(outputs_path, "(top level)", "expected {task, golds: [{id, output}]}")
        file_task = outputs.get("task")
        for i, gold in enumerate(outputs["golds"]):
            if not isinstance(gold, dict) or "id" not in gold or "output" not in gold:
                raise DataError(outputs_path, f"golds[{i}]", "missing field 'id' or 'output'")
            golds[str(gold["id"])] = str(gold["output"])
    spec = _infer_lamp_task(task or file_task, questions, questions_path, outputs_path)
    if spec.labels and questions:
        spec = spec.with_labels(_labels_in_question(str(questions[0].get("input", ""))) or spec.labels)

    users: dict[str, UserData] = {}
    profiles: dict[str, dict[str, dict]] = {}
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise DataError(questions_path, i, "expected a question object")
        for name in ("id", "input", "profile"):
            if name not in q:
                raise DataError(questions_path, f"{i} (id {q.get('id', '?')})", f"missing field {name!r}")
        if not isinstance(q["profile"], list):
            raise DataError(questions_path, f"{i} (id {q['id']})", "field 'profile' must be a list")
        user_id = str(q.get("user_id", q["id"]))
        users.setdefault(user_id, UserData(user_id)).questions.append(
            _example(str(q["id"]), str(q["input"]), golds.get(str(q["id"]))))
        for j, item in enumerate(q["profile"]):
            if not isinstance(item, dict):
                raise DataError(questions_path, f"{i} (id {q['id']})",
                                f"profile[{j}] must be an object, not {type(item).__name__}")
            profiles.setdefault(user_id, {}).setdefault(str(item.get("id", f"{q['id']}/{j}")), item)

    for user_id, data in users.items():
        asked = [ex.question for ex in data.questions]
        items = [p for p in profiles.get(user_id, {}).values() if not _is_asked(spec, p, asked)]
        items.sort(key=lambda p: (spec.to_memory(p).timestamp or 0))  # stable: file order breaks ties
        data.memories = [spec.to_memory(p) for p in items]
        data.replays = memory_replays(spec, data.memories)
    return TaskData(spec, users, str(questions_path))


# ---------------------------------------------------------------- generic JSONL

def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each non-empty line of a JSONL file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, f"line {lineno}", f"not UTF-8 text (byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"line {lineno}", f"not valid JSON ({exc.msg})") from None


def _table_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a Parquet file or of a dataset saved with `save_to_disk`."""
    import datasets

    table = datasets.Dataset.from_parquet(str(path)) if path.is_file() else datasets.load_from_disk(str(path))
    for i, row in enumerate(table):
        yield f"row {i}", row


def interaction_log(path: Path, records: Iterable[tuple[str, Any]], kind: Kind = "generation",
                    labels: tuple[str, ...] | None = None, holdout: int = 1) -> TaskData:
    """Interaction logs, one record per interaction with user_id, timestamp, input, output, metadata.

    Each user's latest `holdout` interactions with an output become held-out questions; the rest
    is their history. For classification without `labels`, the label set is the outputs seen.
    """
    rows: dict[str, list[dict]] = {}
    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(path, where, "expected a JSON object")
        for name in ("user_id", "input"):
            if row.get(name) in (None, ""):
                raise DataError(path, where, f"missing field {name!r}")
        if row.get("metadata") is not None and not isinstance(row["metadata"], dict):
            raise DataError(path, where, "field 'metadata' must be an object")
        ts = row.get("timestamp")
        if ts is not None and not isinstance(ts, (int, float)):
            raise DataError(path, where, "field 'timestamp' must be a number (seconds)")
        rows.setdefault(str(row["user_id"]), []).append(row)
    if kind != "generation" and not labels:
        labels = tuple(sorted({str(r["output"]) for rs in rows.values() for r in rs if r.get("output") is not None}))
    spec = generic_task(kind, labels, name=path.stem)
    users = {}
    for user_id, items in rows.items():
        items.sort(key=lambda r: r.get("timestamp") or 0)
        answered = [i for i, r in enumerate(items) if r.get("output") not in (None, "")]
        held = set(answered[-holdout:]) if holdout and len(answered) > holdout else set()
        history = [r for i, r in enumerate(items) if i not in held]
        data = UserData(user_id)
        data.memories = [spec.to_memory(r) for r in history]
        data.replays = memory_replays(spec, data.memories)
        data.questions = [_example(f"{user_id}/{i}", items[i]["input"], str(items[i]["output"])) for i in sorted(held)]
        users[user_id] = data
    return TaskData(spec, users, str(path))


def load_jsonl(path: str | Path, kind: Kind = "generation", labels: tuple[str, ...] | None = None,
               holdout: int = 1) -> TaskData:
    """Read a JSONL interaction log (see `interaction_log`)."""
    return interaction_log(Path(path), _jsonl_records(Path(path)), kind, labels, holdout)


def _is_table(path: Path) -> bool:
    return path.suffix == ".parquet" or (path / "dataset_info.json").exists()


def load(path: str | Path, task: str | None = None, **log_options) -> TaskData:
    """Load a LaMP file or folder, or an interaction log (`task` is then its kind): a `.jsonl` file,
    a Parquet file with the same columns, or a `datasets.Dataset` saved with `save_to_disk`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".jsonl" or _is_table(path):
        kinds = ("classification", "rating", "generation")
        if task is not None and task not in kinds:
            raise ValueError(f"{path}: for an interaction log the task is its kind, one of {', '.join(kinds)}; "
                             f"not {task!r}")
        records = _jsonl_records(path) if path.suffix == ".jsonl" else _table_records(path)
        return interaction_log(path, records, task or "generation", **log_options)
    return load_lamp(path, task)
