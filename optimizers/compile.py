"""Offline compile: per-user programs from per-user data, tracked in MLflow.

Compiling one user is a pure function of (that user's data, the config) -> persona artifact: the
stages of `optimizers.pipeline`, resumed where their inputs are unchanged. So users map onto worker
processes or a Ray cluster (`engines`), and `compile_users` passes over them twice, each time through
the engine: every user up to `history`; then the population model is fitted on all of their answered
histories and saved as a new version in the store (`population/vNNN.json`) and in the compile's
MLflow run; then, with it, every user through the rest.

Each user's compile is tracked in an MLflow run of its own, nested under the compile's; tracking
only observes. A user whose compile fails is reported and the others go on; a crash leaves the last
good persona in place (every file is replaced atomically).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import dspy
from tqdm import tqdm

from ..data.loaders import TaskData, UserData
from ..data.tasks import TaskSpec, task_from_dict, task_to_dict
from ..program.lm import UsageMeter, make_lm, use_lm
from ..program.store import ProgramState, UserStore
from .engines import Engine, LocalEngine
from .persona import Aligned
from .pipeline import (CompileConfig, Ingested, Stage, align, answer_history, ingest, population_model, run_stages,
                       profile, save, stage_keys)
from .population import Answered, PopulationModel
from .tracking import MlflowObserver, Observer, StageTimes, Tracker, tracking_uri_or_default, untraced


@dataclass
class UserResult:
    user_id: str
    status: Literal["compiled", "skipped", "failed"]
    error: str = ""
    scores: list[float | None] = field(default_factory=list)  # validation score per persona version
    lm_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # stage (that ran) or alignment phase -> seconds
    persona_before: str = ""
    persona_after: str = ""
    details: str = ""  # the traceback of a failure, for the MLflow run
    tracking_errors: list[str] = field(default_factory=list)  # MLflow calls that failed; the compile went on
    score_after: float | None = None  # the validation score of the persona in force after the compile
    stages_run: list[str] = field(default_factory=list)  # the stages that ran (the others resumed)

    @property
    def usage(self) -> dict:
        """What the compile spent: LM calls, tokens and seconds."""
        return {"lm_calls": self.lm_calls, "tokens": self.tokens, "seconds": self.seconds}


# ---------------------------------------------------------------- one user

def compile_user(store_root: str, task_dict: dict, user: UserData | dict, config: CompileConfig,
                 parent_run_id: str | None = None, tracking_uri: str | None = None, population: dict | None = None,
                 spent: dict | None = None, lm: dspy.LM | None = None, until: str | None = None) -> UserResult:
    """Compile one user (their data, or its row of `TaskData.dataset`) through the stages,
    resuming where their inputs are unchanged; tracked in a run of its own (nested under
    `parent_run_id`) when `tracking_uri` is given. `population`: the population model
    (`PopulationModel.to_dict()`) the user is aligned with, if any; `until`: the last stage to run
    (`compile_users` first runs every user up to `history`, untracked, then passes what that
    cost as `spent`, so the user's result and run count it).

    Compiles of one user are serialized by a lock on their directory, across processes: a second
    compile waits, then starts from what the first saved (or skips, if nothing changed), so no
    version is lost. `lm` overrides `config.lm` with an LM object (in-process callers only: it is
    not picklable)."""
    task = task_from_dict(task_dict)
    user = UserData.from_row(user) if isinstance(user, dict) else user
    store = UserStore(store_root, max_versions=config.max_versions)
    model = PopulationModel.from_dict(population) if population else None
    try:
        with store.lock(user.user_id):
            keys = stage_keys(config, task, user, population)
            if until:  # untracked: this user's run is the next pass's, which logs where this time went
                times = StageTimes()
                with untraced():
                    result = _compile(store, task, user, config, keys, lm, times, model, until=until)
                return replace(result, timings=times.seconds)
            previous = store.load_state(user.user_id)
            # The program names the key it was saved under: the one truth of what it was compiled
            # from, even when a kill came between writing it and logging its stage.
            if previous is not None and previous.compile_key == keys["save"]:
                return UserResult(user.user_id, "skipped", scores=[v.score for v in previous.versions],
                                  score_after=previous.current.score)
            if not tracking_uri:
                return _compile(store, task, user, config, keys, lm, Observer(), model, spent)
            tracker = Tracker(tracking_uri, "personaagent-compile", autolog=True)
            # The compile's traces land in the user's run, so forgetting the user finds them.
            with tracker.run(f"user {user.user_id}", {"user_id": user.user_id}, parent_run_id):
                result = _compile(store, task, user, config, keys, lm, MlflowObserver(tracker, config.register_prompts),
                                  model, spent)
            result.tracking_errors = tracker.errors
            return result
    finally:
        store.close()


def _compile(store: UserStore, task: TaskSpec, user: UserData, config: CompileConfig, keys: dict[str, str],
             lm: dspy.LM | None, observer: Observer, population: PopulationModel | None,
             spent: dict | None = None, until: str | None = None) -> UserResult:
    lm = lm or make_lm(config.lm, api_base=config.api_base)
    started = time.perf_counter()
    spent = spent or {"lm_calls": 0, "tokens": 0, "seconds": 0.0, "stages_run": [], "timings": {}}
    uid = user.user_id
    try:
        previous = store.load_state(uid)
        with use_lm(lm), UsageMeter(lm) as usage:
            stages = [
                Stage("ingest", lambda _: ingest(store, user), lambda logged: Ingested(**logged), asdict),
                Stage("profile", lambda _: profile(store, uid, task), lambda _: store.profile(uid)),
                Stage("history", lambda _: answer_history(store, user, task, config, previous),
                      lambda logged: [Answered(**a) for a in logged], lambda out: [asdict(a) for a in out]),
                Stage("align", lambda done: align(store, user, task, config, previous, lm, observer, done["history"],
                                                  population), Aligned.from_dict, asdict, lambda out: out.timings),
                Stage("save", lambda done: save(store, uid, task, config, previous, done["align"], keys["save"],
                                                observer)[0], lambda _: store.load_state(uid)),  # the saved state
            ]
            if until:
                stages = stages[:[stage.name for stage in stages].index(until) + 1]
            try:
                done, ran = run_stages(store, uid, stages, keys, observer)
            finally:  # the first pass's stages, in this user's run, whether or not the rest failed
                for name, seconds in spent["timings"].items():
                    observer.stage(name, seconds, ran=True)
        if until:
            return UserResult(uid, "compiled", lm_calls=usage.calls, tokens=usage.tokens,
                              seconds=time.perf_counter() - started, stages_run=ran)
        state: ProgramState = done["save"]
        aligned: Aligned = done["align"]
        result = UserResult(uid, "compiled", scores=[v.score for v in state.versions], score_after=state.current.score,
                            lm_calls=usage.calls + spent["lm_calls"], tokens=usage.tokens + spent["tokens"],
                            seconds=time.perf_counter() - started + spent["seconds"],
                            timings={**spent["timings"], **aligned.timings}, stages_run=spent["stages_run"] + ran,
                            persona_before=aligned.versions[0].instructions.get("answer", ""),
                            persona_after=state.current.instructions.get("answer", ""))
    except Exception as exc:  # one user's failure must not stop the others
        result = UserResult(uid, "failed", f"{type(exc).__name__}: {exc}",
                            seconds=time.perf_counter() - started, details=traceback.format_exc(limit=3))
    observer.finished(result.status, result.usage,
                      f"{result.error}\n\n{result.details}" if result.error else "")
    return result


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
    observes: when MLflow fails, users are compiled and saved all the same.

    With the persona optimizer on a closed-set or styled-text task, every user is first run up to
    `history`; the population model is fitted on all of their answered histories and saved; then
    each user is aligned with it. A user whose first pass failed is reported and not aligned."""
    engine = engine or LocalEngine(workers, lm)
    UserStore(store).close()  # a store that cannot be a directory fails here, before any user
    tracker = Tracker(tracking_uri, "personaagent-compile")
    observer = MlflowObserver(tracker)
    uri = tracking_uri_or_default(tracking_uri)
    task_dict = task_to_dict(data.task)
    rows = list(data.dataset)
    with tracker.run(f"compile {data.task.name} ({len(data.users)} users)") as parent:
        observer.started({**asdict(config), "task": data.task.name, "data": data.source, "users": len(data.users),
                          "engine": engine.name, "workers": getattr(engine, "workers", 1)})
        parent_id = parent.info.run_id if parent else None
        first: dict[str, UserResult] = {}
        population = None
        if config.optimizer == "persona" and (data.task.labels or data.task.styled):
            jobs = [(str(store), task_dict, row, config, None, None) for row in rows]
            first = {r.user_id: r
                     for r in _each(engine, partial(compile_user, until="history"), jobs, "history", progress)}
            # Every user the store has compiled counts, not only this compile's: a compile of a few
            # users does not shrink the population to them.
            answered = {uid for uid, r in first.items() if r.status != "failed"} | set(UserStore(store).users())
            population = population_model(store, data.task, sorted(answered))
            if population:
                observer.population(population, UserStore(store).save_population(population))
        # The first pass's cost is the user's too: their result and run count it.
        spent = {uid: {**r.usage, "stages_run": r.stages_run, "timings": r.timings} for uid, r in first.items()}
        jobs = [(str(store), task_dict, row, config, parent_id, uri, population, spent.get(row["user_id"]))
                for row in rows if first.get(row["user_id"]) is None or first[row["user_id"]].status != "failed"]
        results = [r for r in first.values() if r.status == "failed"]
        results += _each(engine, compile_user, jobs, "compile", progress)
        report = CompileReport(results, parent_id, tracker.errors)
        observer.reported(report)
    return report


def _each(engine: Engine, compile_one, jobs: list[tuple], stage: str, progress: bool):
    """The engine's results for `jobs`, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=stage, unit="user", disable=not progress)
    for result in engine.run(compile_one, jobs):
        bar.set_postfix_str(result.user_id[:30])
        bar.update()
        yield result
    bar.close()

