"""Offline compile: per-user programs from per-user data, tracked in MLflow.

Compiling one user is a pure function of (that user's data, the config) -> persona artifact, so
users map onto worker processes here (one llama.cpp model per process) and onto a distributed
engine later. A user whose config and data have not changed since their last compile is skipped;
a user whose compile fails is reported and the others go on; a crash leaves the last good
persona in place (the program file is replaced atomically, and only at the end).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import dspy
from tqdm import tqdm

from ..data.loaders import TaskData, UserData
from ..data.tasks import TaskSpec, task_from_dict, task_to_dict
from ..program.agent import default_sources
from ..program.lm import DEFAULT_LM, UsageMeter, make_lm, use_lm
from ..program.memory import Cutoff, SemanticMemory
from ..program.persona import Persona
from ..program.storage import MAX_VERSIONS
from ..program.store import PersonaVersion, ProgramState, UserStore, alignment_versions
from .engines import Engine, LocalEngine
from .persona import ACCEPTANCE, PersonaAlignment
from .tracking import Tracker, tracking_uri_or_default

Optimizer = Literal["persona", "gepa", "none"]


@dataclass
class CompileConfig:
    lm: str = DEFAULT_LM
    reflection_lm: str | None = None  # None: the answering LM reflects too
    optimizer: Optimizer = "persona"
    n_recent: int = 3  # latest interactions replayed (the paper's n)
    iterations: int = 1
    acceptance: str = "validated"  # or "always", the paper's setting
    validation: int = 3  # past interactions before the replays that every candidate is scored on
    max_lm_calls: int = 10  # per user's alignment; one label-scoring pass is one call
    gepa_budget: int = 15
    k: int = 4
    max_versions: int = MAX_VERSIONS  # persona versions kept per user

    def __post_init__(self):
        if self.optimizer not in ("persona", "gepa", "none"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose persona, gepa or none")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"unknown acceptance {self.acceptance!r}; choose {' or '.join(ACCEPTANCE)}")
        if self.n_recent < 1 or self.iterations < 1 or self.k < 1 or self.max_lm_calls < 1 or self.validation < 0:
            raise ValueError("n_recent, iterations, k and max_lm_calls must be at least 1, validation at least 0")


@dataclass
class UserResult:
    user_id: str
    status: Literal["compiled", "skipped", "failed"]
    error: str = ""
    scores: list[float | None] = field(default_factory=list)  # replay score per persona version
    lm_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # alignment phase -> seconds
    persona_before: str = ""
    persona_after: str = ""
    details: str = ""  # the traceback of a failure, for the MLflow run
    tracking_errors: list[str] = field(default_factory=list)  # MLflow calls that failed; the compile went on
    score_after: float | None = None  # the validation score of the persona in force after the compile


def compile_key(config: CompileConfig, task: TaskSpec, user: UserData) -> str:
    """Same config, task and data give the same key: such a user is already compiled."""
    payload = {
        "config": asdict(config),
        "task": task_to_dict(task),
        "memories": [[m.input, m.output, m.timestamp] for m in user.memories],
        "replays": [[r.input, r.output] for r in user.replays],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _examples(user: UserData) -> list[dspy.Example]:
    """The user's replayable interactions, oldest first, each replayed as of its own record."""
    return [
        dspy.Example(question=r.input, answer=r.output,
                     as_of=Cutoff(r.metadata.get("memory_key"), r.timestamp)).with_inputs("question", "as_of")
        for r in user.replays
    ]


def _align(config: CompileConfig, program, examples, lm, task):
    """Run the configured optimizer; returns the aligned program and its AlignmentSteps (none for GEPA)."""
    if config.optimizer == "none":
        return program, []
    reflection_lm = make_lm(config.reflection_lm) if config.reflection_lm else lm
    if config.optimizer == "persona":
        aligned = PersonaAlignment(config.n_recent, config.iterations, config.acceptance, reflection_lm,
                                   config.validation, config.max_lm_calls).compile(program, trainset=examples)
        return aligned, aligned.alignment
    from .gepa import gepa_optimizer

    recent = examples[-config.n_recent:]
    aligned = gepa_optimizer(task, reflection_lm, config.gepa_budget).compile(program, trainset=recent, valset=recent)
    return aligned, []


def compile_user(store_root: str, task_dict: dict, user: UserData, config: CompileConfig,
                 parent_run_id: str | None = None, tracking_uri: str | None = None,
                 lm: dspy.LM | None = None) -> UserResult:
    """Compile one user: ingest memory, write the profile, align the persona, save atomically;
    tracked in a run of its own (nested under `parent_run_id`) when `tracking_uri` is given.

    Compiles of one user are serialized by a lock on their directory, across processes: a second
    compile waits, then starts from what the first saved (or skips, if nothing changed), so no
    version is lost. `lm` overrides `config.lm` with an LM object (in-process callers only: it is
    not picklable)."""
    task = task_from_dict(task_dict)
    store = UserStore(store_root, max_versions=config.max_versions)
    try:
        with store.lock(user.user_id):
            key = compile_key(config, task, user)
            previous = store.load_state(user.user_id)
            if previous is not None and previous.compile_key == key:
                return UserResult(user.user_id, "skipped", scores=[v.score for v in previous.versions],
                                  score_after=previous.current.score)
            tracker = Tracker(tracking_uri, "personaagent-compile", autolog=True) if tracking_uri else None
            run = tracker.run(f"user {user.user_id}", {"user_id": user.user_id}, parent_run_id) if tracker else contextlib.nullcontext()
            with run:  # the compile's traces land in the user's run, so forgetting the user finds them
                result = _compile(store, task, user, config, previous, key, lm)
                if tracker:
                    _log_user(tracker, result, store.load_state(user.user_id) if result.status == "compiled" else None)
                    # Traces are exported in the background: stored before the user counts as done.
                    tracker.call("store the traces", "flush_trace_async_logging")
            if tracker:
                result.tracking_errors = tracker.errors
            return result
    finally:
        store.close()


def _compile(store: UserStore, task: TaskSpec, user: UserData, config: CompileConfig,
             previous: ProgramState | None, key: str, lm: dspy.LM | None) -> UserResult:
    lm = lm or make_lm(config.lm)
    started = time.perf_counter()
    try:
        with use_lm(lm), UsageMeter(lm) as usage:
            memory = store.memory(user.user_id)
            memory.add(user.memories)
            memory.flush()
            profile = SemanticMemory()(task=task, records=memory.all(), previous=store.profile(user.user_id)).profile
            store.save_profile(user.user_id, profile)
            start = previous.persona if previous else Persona.initial(default_sources(task))
            program = store.build(user.user_id, task, start, "persona", config.k)
            if previous:
                program.load_instructions(previous.current.instructions)
            before = program.instructions
            aligned, steps = _align(config, program, _examples(user), lm, task)
        versions = alignment_versions(previous, program, steps, trigger="compile")
        if config.optimizer == "gepa":
            versions.append(PersonaVersion(versions[-1].version + 1, aligned.persona.to_dict(),
                                           aligned.instructions_by_predictor(), note="gepa", trigger="compile"))
        state = ProgramState(user.user_id, task_to_dict(task), config.lm, versions, key,
                             created_at=previous.created_at if previous else time.time())
        store.save_state(state)
        return UserResult(user.user_id, "compiled", scores=[v.score for v in versions], score_after=state.current.score,
                          lm_calls=usage.calls,
                          tokens=usage.tokens, seconds=time.perf_counter() - started,
                          timings=getattr(aligned, "timings", {}),
                          persona_before=before, persona_after=state.current.instructions.get("answer", ""))
    except Exception as exc:  # one user's failure must not stop the others
        return UserResult(user.user_id, "failed", f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - started, details=traceback.format_exc(limit=3))


def _log_user(tracker: Tracker, result: UserResult, state: ProgramState | None) -> None:
    """The user's run: status, costs, where the time went, and every persona version with its
    validation score. Each call is contained: a failing sink loses the record, not the compile."""
    tracker.call("tag the status", "set_tag", "status", result.status)
    tracker.call("log costs", "log_metrics", {"lm_calls": result.lm_calls, "tokens": result.tokens, "seconds": result.seconds,
                                              **{f"seconds_{phase}": s for phase, s in result.timings.items()}})
    if result.error:
        tracker.call("log the error", "log_text", result.error + "\n\n" + result.details, "error.txt")
    if state is None:
        return
    for step, version in enumerate(state.versions):
        if version.score is not None:
            tracker.call("log a validation score", "log_metric", "validation_score", version.score, step=step)
        if version.likelihood is not None:
            tracker.call("log a validation likelihood", "log_metric", "validation_likelihood", version.likelihood, step=step)
        tracker.call("log a persona version", "log_text", version.instructions.get("answer", ""), f"personas/v{version.version:03d}.md")
        tracker.call("log a persona version", "log_dict", asdict(version), f"personas/v{version.version:03d}.json")
        if step:
            # Markdown, so the UI's artifact view renders it (it does not preview a .diff file).
            tracker.call("log a persona diff", "log_text", f"```diff\n{version.diff(state.versions[step - 1])}\n```\n",
                         f"personas/v{version.version:03d}.diff.md")
    tracker.call("log the persona", "log_text", state.current.instructions.get("answer", ""), "persona.md")
    tracker.call("describe the run", "set_tag", "mlflow.note.content", _description(state))


def _description(state: ProgramState) -> str:
    """The run's description in the MLflow UI: every version with its validation score and what
    became of it, then what the persona in force changed from the first one."""
    score = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"**{state.user_id}**: v{state.current.version} in force", ""]
    lines += [f"- v{v.version}: {'accepted' if v.accepted else 'rejected'}, validation score {score(v.score)}"
              f"{f' ({v.note})' if v.note else ''}" for v in state.versions]
    first = state.versions[0]
    if state.current.version != first.version:
        lines += ["", f"What v{state.current.version} changed from v{first.version}:", "```diff", state.current.diff(first), "```"]
    return "\n".join(lines)


@dataclass
class CompileReport:
    results: list[UserResult]
    run_id: str | None
    tracking_errors: list[str] = field(default_factory=list)  # of the parent run; each user's are in its result

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("compiled", "skipped", "failed")}

    @property
    def all_failed(self) -> bool:
        return bool(self.results) and all(r.status == "failed" for r in self.results)


def compile_users(data: TaskData, store: str | Path, config: CompileConfig, workers: int = 1,
                  tracking_uri: str | None = None, progress: bool = True, lm: dspy.LM | None = None,
                  engine: Engine | None = None) -> CompileReport:
    """Compile every user in `data` into `store`; one parent MLflow run, one nested run per user.
    `engine` says where users run (default: `LocalEngine(workers, lm)`, this machine). Tracking only
    observes: when MLflow fails, users are compiled and saved all the same."""
    engine = engine or LocalEngine(workers, lm)
    UserStore(store).close()  # a store that cannot be a directory fails here, before any user
    tracker = Tracker(tracking_uri, "personaagent-compile")
    uri = tracking_uri_or_default(tracking_uri)
    task_dict = task_to_dict(data.task)
    results: list[UserResult] = []
    with tracker.run(f"compile {data.task.name} ({len(data.users)} users)") as parent:
        tracker.call("log the config", "log_params", {**asdict(config), "task": data.task.name, "data": data.source,
                                                     "users": len(data.users), "engine": engine.name,
                                                     "workers": getattr(engine, "workers", 1)})
        parent_id = parent.info.run_id if parent else None
        bar = tqdm(total=len(data.users), desc="compile", unit="user", disable=not progress)
        jobs = [(str(store), task_dict, user, config, parent_id, uri) for user in data.users.values()]
        for result in engine.run(compile_user, jobs):
            results.append(result)
            bar.set_postfix_str(result.user_id[:30])
            bar.update()
        bar.close()
        report = CompileReport(results, parent_id, tracker.errors)
        tracker.call("log the counts", "log_metrics", {f"users_{k}": v for k, v in report.counts.items()})
        tracker.call("log the users' table", "log_table", {
            "user": [r.user_id for r in results], "status": [r.status for r in results],
            "validation_before": [r.scores[0] if r.scores else None for r in results],
            "validation_after": [r.score_after for r in results]}, "users.json")
        done = [r for r in results if r.status == "compiled"]
        if done:
            tracker.call("log the means", "log_metrics", {"mean_lm_calls_per_user": sum(r.lm_calls for r in done) / len(done),
                                                          "mean_seconds_per_user": sum(r.seconds for r in done) / len(done)})
    return report
