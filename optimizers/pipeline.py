"""The one home of a user's stages: what aligning a user means, for the compile, the service and `eval`.

A user's program is made in named stages, each a function with typed inputs and output that is
saved, as STORM's engine runs and saves its stages:

    ingest   the user's interactions -> their episodic memory     (episodic.sqlite, .faiss)
    profile  their memory -> the semantic profile (one LM call)    (profile.json; not for a styled text)
    history  their latest interactions, answered as of their times (stages.json)
    align    history, the population model, config -> the versions the optimizer ran (stages.json)
    save     those versions -> the user's program history          (program.json)

Between `history` and `align`, one step looks at every user: the population model
(`optimizers.population`, fitted here by `population_model`) is fitted on all users' answered
histories, cross-fitted by folds of users.

Each stage has a key of its inputs (the previous stage's key included, `stage_keys`), kept in the
user's `stages.json` once its output is saved; `run_stages` resumes at the first stage whose key
changed. The optimizer (`OPTIMIZERS`) returns the versions it ran, and `ProgramState.record` numbers
them into the history. Callers:
- the compile (`optimizers.compile`) runs every stage over its users;
- the service's alignments (an align request, online alignment) run `realign` (`history` and
  `align`) on the replays the user's memory gives (`data.loaders.memory_replays`, which makes a
  dataset's replays too) with the store's population model, then `save`;
- `eval` prepares its shared store with `ingest` and `write_profile`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import dspy

from ..data.loaders import UserData
from ..data.tasks import TaskSpec, task_to_dict
from ..program.agent import PersonaProgram, default_sources
from ..program.lm import DEFAULT_LM, make_lm
from ..program.memory import Cutoff, Profile, SemanticMemory
from ..program.persona import Persona, PersonaVersion
from ..program.storage import MAX_VERSIONS
from ..program.store import ProgramState, UserStore
from .gepa import GepaAlignment
from .persona import (Aligned, AlignmentConfig, PersonaAlignment, Unaligned, VersionedTeleprompter, past_interaction,
                      text_source)
from .population import Answered, PopulationModel, fit_population, fit_text_effects
from .tracking import Observer, seconds_metrics

# The optimizers, by name: each makes a teleprompter that returns the versions it ran.
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
    api_base: str | None = field(default=None, metadata={
        "help": "base URL of an OpenAI-compatible server for --lm"})
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


# ---------------------------------------------------------------- the stages

@dataclass
class Ingested:
    """The ingest stage's output: how many records the user's memory holds."""

    records: int


def ingest(store: UserStore, user: UserData) -> Ingested:
    memory = store.memory(user.user_id)
    memory.add(user.memories)  # interactions already in memory are skipped
    memory.flush()
    return Ingested(len(memory.all()))


def write_profile(store: UserStore, user_id: str, task: TaskSpec) -> Profile:
    """The semantic profile, updated from the records it does not cover yet (one LM call)."""
    written = SemanticMemory()(task=task, records=store.memory(user_id).all(), previous=store.profile(user_id)).profile
    store.save_profile(user_id, written)
    return written


def writes_profile(task: TaskSpec) -> bool:
    """Whether the profile stage writes a profile for `task`: where the user's program shows it
    (`default_sources`) or writing their persona text reads it (`TextSource.reads_profile`). A
    headline does neither (its style is computed from their past headlines): writing one would
    spend a generation, about 12 s of a LaMP-4 compile's 30 s, on nothing."""
    return "read_profile" in default_sources(task) or text_source(task).reads_profile


def profile(store: UserStore, user_id: str, task: TaskSpec) -> Profile:
    """The profile stage: the profile written (one LM call) where `writes_profile`, else as it is."""
    return write_profile(store, user_id, task) if writes_profile(task) else store.profile(user_id)


def _student(store: UserStore, user_id: str, task: TaskSpec, previous: ProgramState | None) -> PersonaProgram:
    """The program alignment starts from: the version in force, or a new persona (a persona carries
    its own k, not `CompileConfig.k`)."""
    if previous:
        return store.restore(user_id, task, previous.current)
    return store.build(user_id, task, Persona.initial(default_sources(task)))


def answer_history(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig,
                   previous: ProgramState | None) -> list[Answered]:
    """The user's latest interactions answered as of their own times by the program alignment
    starts from (only the persona optimizer learns from them; the others need none)."""
    if config.optimizer != "persona":
        return []
    teleprompter = OPTIMIZERS[config.optimizer](config, None, Observer())
    return teleprompter.answer_history(_student(store, user.user_id, task, previous), examples(user))


def align(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig, previous: ProgramState | None,
          lm: dspy.LM, observer: Observer, history: list[Answered], population: PopulationModel | None,
          reflection_lm: dspy.LM | None = None) -> Aligned:
    """The user's program aligned by the configured optimizer on their replayable interactions,
    from their answered history and the population model's fold that excludes them. `reflection_lm`
    overrides `config.reflection_lm` with an LM object (default: `lm`)."""
    reflection_lm = reflection_lm or (make_lm(config.reflection_lm) if config.reflection_lm else lm)
    teleprompter = OPTIMIZERS[config.optimizer](config, reflection_lm, observer)
    return teleprompter.align(_student(store, user.user_id, task, previous), trainset=examples(user), answered=history,
                              **(population.alignment_args(user.user_id) if population else {}))


def realign(store: UserStore, user: UserData, task: TaskSpec, config: CompileConfig, previous: ProgramState | None,
            lm: dspy.LM, observer: Observer, population: PopulationModel | None,
            reflection_lm: dspy.LM | None = None) -> Aligned:
    """An alignment that serving triggers (an align request, online alignment): the `history` and
    `align` stages as a compile runs them, so it gets the versions a compile of the same user and
    data gets, with every setting of `config`. Its timings include the history's; saving (`save`)
    is the caller's, under its own locks."""
    started = time.perf_counter()
    history = answer_history(store, user, task, config, previous)
    seconds = time.perf_counter() - started
    aligned = align(store, user, task, config, previous, lm, observer, history, population, reflection_lm)
    return replace(aligned, timings={"history": seconds, **aligned.timings})


def save(store: UserStore, user_id: str, task: TaskSpec, config: CompileConfig, previous: ProgramState | None,
         aligned: Aligned, key: str, observer: Observer,
         trigger: str = "compile") -> tuple[ProgramState, list[PersonaVersion]]:
    """The aligned versions recorded into the user's history, as made by `trigger`, and saved under
    `key` (a rerun of the compile with the same key skips the user, so they are never recorded twice).
    Returns the saved state and the versions it added (those the store's bound on versions kept)."""
    state = ProgramState.continuing(previous, user_id, task_to_dict(task), config.lm, key)
    recorded = state.record(aligned.versions, trigger=trigger)
    store.save_state(state)
    added = [v for v in state.versions if v in recorded]
    observer.saved(state, added)
    return state, added


def examples(user: UserData) -> list[dspy.Example]:
    """The user's replayable interactions, oldest first, each replayed as of its own record."""
    return [past_interaction(r.input, r.output, Cutoff(r.metadata.get("memory_key"), r.timestamp))
            for r in user.replays]


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


# ---------------------------------------------------------------- keys and resuming

def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


# The settings each stage reads first: a later stage reads them through that stage's key, which its
# own key includes (history: which interactions are answered, and by which program). `save` reads none
# of its own: re-saving the same aligned versions would record them twice, so its key is align's.
# `k`, `max_versions`, `register_prompts` and `api_base` are in no key: a persona carries its own k,
# `max_versions` only trims the kept history at the user's next save, `register_prompts` only tells the
# tracker what to record, and `api_base` says where the same model is served; a change of them alone
# recompiles no one.
STAGE_SETTINGS = {
    "profile": ("lm",),
    "history": ("optimizer", "n_recent", "iterations", "acceptance", "validation", "max_lm_calls"),
    "align": ("reflection_lm", "gepa_budget"),
}


def _settings(config: CompileConfig, stage: str) -> dict[str, Any]:
    return {name: getattr(config, name) for name in STAGE_SETTINGS[stage]}


def stage_keys(config: CompileConfig, task: TaskSpec, user: UserData, population: dict | None = None) -> dict[str, str]:
    """Each stage's key: its own inputs and the key of the stage before it (`population`: the
    population model the user is aligned with, `PopulationModel.to_dict()`, if any)."""
    ingest_key = _key([[m.input, m.output, m.timestamp] for m in user.memories])
    profile_key = _key(ingest_key, task_to_dict(task), _settings(config, "profile"))
    history_key = _key(profile_key, _settings(config, "history"), [[r.input, r.output] for r in user.replays])
    align_key = _key(history_key, _settings(config, "align"), _key(population) if population else "")
    return {"ingest": ingest_key, "profile": profile_key, "history": history_key, "align": align_key,
            "save": align_key}


@dataclass
class Stage:
    """A named stage of a user's compile: `run`, given the outputs of the stages before it, makes
    its output and saves it; `load` reads the saved output back when the stage is resumed. An
    output that is not one of the store's own files is kept in the stage log, as `to_log` writes it;
    `timings` says where a run's time went, for the tracker."""

    name: str
    run: Callable[[dict[str, Any]], Any]
    load: Callable[[Any], Any]
    to_log: Callable[[Any], Any] = lambda output: None
    timings: Callable[[Any], dict[str, float]] = lambda output: {}


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
                       metrics=seconds_metrics(stage.timings(output)))
    return outputs, ran
