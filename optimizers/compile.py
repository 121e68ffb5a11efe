"""Offline compile: per-user programs from per-user data, tracked in MLflow.

Compiling one user is a pure function of (that user's data, the config) -> persona artifact, so
users map onto worker processes or a Ray cluster (`engines`). It runs as named stages, each a
function with typed inputs and output that is saved, as STORM's engine runs and saves its stages:

    ingest   the user's interactions -> their episodic memory     (episodic.sqlite, .faiss)
    profile  their memory -> the semantic profile (one LM call)    (profile.json)
    history  their latest interactions, answered as of their times (stages.json)
    align    history, the population model, config -> the versions the optimizer ran (stages.json)
    save     those versions -> the user's program history          (program.json)

Between `history` and `align`, one step looks at every user: the population model
(`optimizers.population`) is fitted on all users' answered histories, cross-fitted by folds of
users, and saved as a new version in the store (`population/vNNN.json`) and in the compile's MLflow
run. So `compile_users` runs in two passes over the users, each through the engine: up to
`history`, then, with the population model, the rest.

Each stage has a key of its inputs (the previous stage's key included), kept in the user's
`stages.json` once its output is saved. A rerun resumes at the first stage whose key changed:
nothing changed, nothing runs (the user is skipped); a new `n_recent` re-aligns without
re-ingesting or re-profiling; a compile killed after `align` only saves. A user whose compile
fails is reported and the others go on; a crash leaves the last good persona in place (every
file is replaced atomically). The optimizer emits the versions it ran, and `ProgramState.record`
numbers them into the history: the one path, for the compile, the service and `eval`. The service
aligns a user with the same `answer_history`, `align` and `save`, on the replays their memory gives
(`data.loaders.memory_replays`, which makes a dataset's replays too) and the store's population model.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import dspy
from tqdm import tqdm

from ..data.loaders import TaskData, UserData
from ..data.tasks import TaskSpec, task_from_dict, task_to_dict
from ..program.agent import PersonaProgram, default_sources
from ..program.lm import DEFAULT_LM, UsageMeter, make_lm, use_lm
from ..program.memory import Cutoff, Profile, SemanticMemory
from ..program.persona import Persona, PersonaVersion
from ..program.storage import MAX_VERSIONS
from ..program.store import ProgramState, UserStore
from .engines import Engine, LocalEngine
from .gepa import GepaAlignment
from .persona import AlignmentConfig, PersonaAlignment, Unaligned, VersionedTeleprompter, past_interaction
from .population import Answered, PopulationModel, fit_population, fit_text_effects
from .tracking import MlflowObserver, Observer, Tracker, seconds_metrics, tracking_uri_or_default, untraced

# The optimizers, by name: each makes a teleprompter that emits the versions it ran.
OPTIMIZERS: dict[str, Callable[[CompileConfig, dspy.LM, Observer], VersionedTeleprompter]] = {
    "persona": lambda config, reflection_lm, observer: PersonaAlignment(
        config.n_recent, config.iterations, config.acceptance, reflection_lm, config.validation,
        config.max_lm_calls, on_version=observer.version),
    "gepa": lambda config, reflection_lm, observer: GepaAlignment(
        reflection_lm, config.gepa_budget, config.n_recent, config.validation, on_version=observer.version),
    "unaligned": lambda config, reflection_lm, observer: Unaligned(on_version=observer.version),
}


@dataclass
class CompileConfig(AlignmentConfig):
    """A compile's settings: the persona alignment's (`AlignmentConfig`, whose checks apply to
    these fields too) and the compile's own. `STAGE_SETTINGS` says which stage reads which."""

    lm: str = field(default=DEFAULT_LM, metadata={
        "help": f"local/<embedded model> (default {DEFAULT_LM}) or any DSPy model string, "
                "e.g. openai/<model> with --api-base for vLLM, Ollama or llama.cpp's server"})
    reflection_lm: str | None = field(default=None, metadata={
        "help": "LM that critiques and rewrites personas (default: --lm)"})
    optimizer: str = field(default="persona", metadata={
        "help": "the teleprompter that aligns each user's program", "choices": tuple(OPTIMIZERS)})
    gepa_budget: int = field(default=15, metadata={"help": "metric calls per user for the gepa optimizer"})
    k: int = field(default=4, metadata={
        "help": "past interactions the baselines' tools return (a persona carries its own k)", "min": 1})
    max_versions: int = field(default=MAX_VERSIONS, metadata={
        "help": "persona versions kept per user: the initial, the best, the current, then the latest"})
    register_prompts: bool = field(default=False, metadata={
        "help": "also register each accepted persona version in MLflow's prompt registry, as a version of "
                "the user's prompt, with the alias 'champion' on the one in force"})


@dataclass
class UserResult:
    user_id: str
    status: Literal["compiled", "skipped", "failed"]
    error: str = ""
    scores: list[float | None] = field(default_factory=list)  # validation score per persona version
    lm_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # stage or alignment phase -> seconds
    persona_before: str = ""
    persona_after: str = ""
    details: str = ""  # the traceback of a failure, for the MLflow run
    tracking_errors: list[str] = field(default_factory=list)  # MLflow calls that failed; the compile went on
    score_after: float | None = None  # the validation score of the persona in force after the compile
    stages_run: list[str] = field(default_factory=list)  # the stages that ran (the others resumed)


# ---------------------------------------------------------------- the stages

@dataclass
class Ingested:
    """The ingest stage's output: how many records the user's memory holds."""

    records: int


@dataclass
class Aligned:
    """The align stage's output: the versions the optimizer ran (unnumbered, the starting state
    first) and where its time went."""

    versions: list[PersonaVersion]
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, payload: dict) -> "Aligned":
        return cls([PersonaVersion(**v) for v in payload["versions"]], payload.get("timings", {}))


def ingest(store: UserStore, user: UserData) -> Ingested:
    memory = store.memory(user.user_id)
    memory.add(user.memories)  # interactions already in memory are skipped
    memory.flush()
    return Ingested(len(memory.all()))


def write_profile(store: UserStore, user_id: str, task: TaskSpec) -> Profile:
    """The semantic profile, updated from the records it does not cover yet (one LM call)."""
    profile = SemanticMemory()(task=task, records=store.memory(user_id).all(), previous=store.profile(user_id)).profile
    store.save_profile(user_id, profile)
    return profile


def _student(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig,
             previous: ProgramState | None) -> PersonaProgram:
    """The program alignment starts from: the persona in force, or a new one."""
    start = previous.persona if previous else Persona.initial(default_sources(task))
    program = store.build(user.user_id, task, start)  # the persona carries its own k, not config.k
    if previous:
        program.load_instructions(previous.current.instructions)
    return program


def answer_history(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig,
                   previous: ProgramState | None) -> list[Answered]:
    """The user's latest interactions answered as of their own times by the program alignment
    starts from (only the persona optimizer learns from them; the others need none)."""
    if config.optimizer != "persona":
        return []
    teleprompter = OPTIMIZERS[config.optimizer](config, None, Observer())
    return teleprompter.answer_history(_student(store, user, task, config, previous), examples(user))


def align(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig, previous: ProgramState | None,
          lm: dspy.LM, observer: Observer, history: list[Answered], population: PopulationModel | None,
          reflection_lm: dspy.LM | None = None) -> Aligned:
    """The user's program aligned by the configured optimizer on their replayable interactions,
    from their answered history and the population model's fold that excludes them. `reflection_lm`
    overrides `config.reflection_lm` with an LM object (default: `lm`)."""
    program = _student(store, user, task, config, previous)
    reflection_lm = reflection_lm or (make_lm(config.reflection_lm) if config.reflection_lm else lm)
    teleprompter = OPTIMIZERS[config.optimizer](config, reflection_lm, observer)
    aligned = teleprompter.compile(program, trainset=examples(user), answered=history,
                                   **(population.alignment_args(user.user_id) if population else {}))
    return Aligned(aligned.alignment, getattr(aligned, "timings", {}))


def save(store: UserStore, user_id: str, task: TaskSpec, config: CompileConfig, previous: ProgramState | None,
         aligned: Aligned, key: str, observer: Observer, trigger: str = "compile") -> ProgramState:
    """The aligned versions recorded into the user's history, as made by `trigger`, and saved under
    `key` (a rerun of the compile with the same key skips the user, so they are never recorded twice)."""
    state = ProgramState.continuing(previous, user_id, task_to_dict(task), config.lm, key)
    added = state.record(aligned.versions, trigger=trigger)
    store.save_state(state)
    observer.saved(state, added)
    return state


def examples(user: UserData) -> list[dspy.Example]:
    """The user's replayable interactions, oldest first, each replayed as of its own record."""
    return [past_interaction(r.input, r.output, Cutoff(r.metadata.get("memory_key"), r.timestamp)) for r in user.replays]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


# The settings each stage reads first: a later stage reads them through that stage's key, which its
# own key includes (history: which interactions are answered, and by which program). `save` reads none
# of its own: re-saving the same aligned versions would record them twice, so its key is align's.
# `k`, `max_versions` and `register_prompts` are in no key: a persona carries its own k, `max_versions`
# only trims the kept history at the user's next save, and `register_prompts` only tells the tracker
# what to record; a change of them alone recompiles no one.
STAGE_SETTINGS = {
    "profile": ("lm",),
    "history": ("optimizer", "n_recent", "iterations", "acceptance", "validation", "max_lm_calls"),
    "align": ("reflection_lm", "gepa_budget"),
}


def _settings(config: CompileConfig, stage: str) -> dict[str, Any]:
    return {name: getattr(config, name) for name in STAGE_SETTINGS[stage]}


def stage_keys(config: CompileConfig, task: TaskSpec, user: UserData, population: str = "") -> dict[str, str]:
    """Each stage's key: its own inputs and the key of the stage before it (`population`: the
    fingerprint of the population model the user is aligned with)."""
    ingest_key = _key([[m.input, m.output, m.timestamp] for m in user.memories])
    profile_key = _key(ingest_key, task_to_dict(task), _settings(config, "profile"))
    history_key = _key(profile_key, _settings(config, "history"), [[r.input, r.output] for r in user.replays])
    align_key = _key(history_key, _settings(config, "align"), population)
    return {"ingest": ingest_key, "profile": profile_key, "history": history_key, "align": align_key,
            "save": align_key}


@dataclass
class Stage:
    """A named stage of a user's compile: `run`, given the outputs of the stages before it, makes
    its output and saves it; `load` reads the saved output back when the stage is resumed. An
    output that is not one of the store's own files is kept in the stage log, as `to_log` writes it."""

    name: str
    run: Callable[[dict[str, Any]], Any]
    load: Callable[[Any], Any]
    to_log: Callable[[Any], Any] = lambda output: None


def run_stages(store: UserStore, user_id: str, stages: list[Stage], keys: dict[str, str],
               observer: Observer) -> tuple[dict[str, Any], list[str]]:
    """Run `stages` in order, resuming: up to the first stage whose key differs from its last
    completed run, each is loaded from its saved output; from there on, each runs, and its key and
    output are logged as soon as it is saved. Returns the outputs by stage and the stages that ran."""
    log = store.stage_log(user_id)
    outputs: dict[str, Any] = {}
    ran: list[str] = []
    for stage in stages:
        entry = log.get(stage.name)
        if not ran and entry and entry.get("key") == keys[stage.name]:
            outputs[stage.name] = stage.load(entry.get("output"))
            observer.stage(stage.name, 0.0, ran=False)
            continue
        started = time.perf_counter()
        outputs[stage.name] = output = stage.run(outputs)
        ran.append(stage.name)
        log[stage.name] = {"key": keys[stage.name], "output": stage.to_log(output)}
        store.save_stage_log(user_id, log)
        observer.stage(stage.name, time.perf_counter() - started, ran=True,
                       metrics=seconds_metrics(getattr(output, "timings", None) or {}))
    return outputs, ran


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
            keys = stage_keys(config, task, user, _key(population) if population else "")
            if until:  # untracked: this user's run is the next pass's
                with untraced():
                    return _compile(store, task, user, config, keys, lm, Observer(), model, until=until)
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
    lm = lm or make_lm(config.lm)
    started = time.perf_counter()
    spent = spent or {"lm_calls": 0, "tokens": 0, "seconds": 0.0, "stages_run": []}
    uid = user.user_id
    try:
        previous = store.load_state(uid)
        with use_lm(lm), UsageMeter(lm) as usage:
            stages = [
                Stage("ingest", lambda _: ingest(store, user), lambda logged: Ingested(**logged), asdict),
                Stage("profile", lambda _: write_profile(store, uid, task), lambda _: store.profile(uid)),
                Stage("history", lambda _: answer_history(store, user, task, config, previous),
                      lambda logged: [Answered(**a) for a in logged], lambda out: [asdict(a) for a in out]),
                Stage("align", lambda done: align(store, user, task, config, previous, lm, observer, done["history"],
                                                  population), Aligned.from_dict, asdict),
                Stage("save", lambda done: save(store, uid, task, config, previous, done["align"], keys["save"], observer),
                      lambda _: store.load_state(uid)),
            ]
            if until:
                stages = stages[:[stage.name for stage in stages].index(until) + 1]
            done, ran = run_stages(store, uid, stages, keys, observer)
        if until:
            return UserResult(uid, "compiled", lm_calls=usage.calls, tokens=usage.tokens,
                              seconds=time.perf_counter() - started, stages_run=ran)
        history_seconds = {"history": spent["seconds"]} if spent["seconds"] else {}
        state: ProgramState = done["save"]
        aligned: Aligned = done["align"]
        result = UserResult(uid, "compiled", scores=[v.score for v in state.versions], score_after=state.current.score,
                            lm_calls=usage.calls + spent["lm_calls"], tokens=usage.tokens + spent["tokens"],
                            seconds=time.perf_counter() - started + spent["seconds"],
                            timings={**history_seconds, **aligned.timings}, stages_run=spent["stages_run"] + ran,
                            persona_before=aligned.versions[0].instructions.get("answer", ""),
                            persona_after=state.current.instructions.get("answer", ""))
    except Exception as exc:  # one user's failure must not stop the others
        result = UserResult(uid, "failed", f"{type(exc).__name__}: {exc}",
                            seconds=time.perf_counter() - started, details=traceback.format_exc(limit=3))
    observer.finished(result.status, {"lm_calls": result.lm_calls, "tokens": result.tokens, "seconds": result.seconds},
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
            first = {r.user_id: r for r in _each(engine, partial(compile_user, until="history"), jobs, "history", progress)}
            # Every user the store has compiled counts, not only this compile's: a compile of a few
            # users does not shrink the population to them.
            answered = {uid for uid, r in first.items() if r.status != "failed"} | set(UserStore(store).users())
            population = population_model(store, data.task, sorted(answered))
            if population:
                observer.population(population, UserStore(store).save_population(population))
        # The first pass's cost is the user's too: their result and run count it.
        spent = {uid: {"lm_calls": r.lm_calls, "tokens": r.tokens, "seconds": r.seconds, "stages_run": r.stages_run}
                 for uid, r in first.items()}
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


def population_model(store: str | Path, task: TaskSpec, user_ids: list[str]) -> dict | None:
    """The population model fitted on these users' answered histories, as their `history` stage
    saved them (None when no user has one)."""
    users = UserStore(store, embedder=object())
    histories = {uid: [Answered(**a) for a in (users.stage_log(uid).get("history") or {}).get("output") or []]
                 for uid in user_ids}
    histories = {uid: items for uid, items in histories.items() if items}
    if not histories:
        return None
    if not task.labels:  # a styled text: whether the text computed from a user's history pays
        return fit_text_effects(task.score, histories).to_dict()
    return fit_population(task.labels, histories, use_bias=not task.has_candidates).to_dict()
