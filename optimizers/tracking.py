"""MLflow tracking that observes the work and never stops it, and forgetting a user in MLflow.

The compile and the service's alignment tell an `Observer` of their events (a stage done, a
persona version made, versions saved, a user or a compile finished); `MlflowObserver` logs each
as it happens, and is the only place the work meets MLflow. Like GEPA's callbacks, it only
observes and contains its own errors, through `Tracker`. Each MLflow call
is retried briefly (a locked SQLite file, two processes creating a new database at once); if it
still fails, the error is kept in `errors`, for the caller to report per user, and the work goes on.
Runs record their process, so runs left RUNNING by a killed compile are ended as KILLED by the next
one, and a run interrupted in-process (Ctrl-C, SIGTERM) ends as KILLED, an error as FAILED.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from ..program.persona import PersonaVersion
    from ..program.store import ProgramState

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
HOST_TAG, PID_TAG = "personaagent.host", "personaagent.pid"
CHAMPION = "champion"  # the prompt registry's alias of the persona version in force
PERSONA_VERSION_TAG = "persona_version"  # a registered prompt version's persona version in the store


def offline_environment() -> None:
    """Settings every process that imports dspy/litellm next to mlflow needs offline: without the
    local cost map, litellm retries a download at import and `mlflow server` deadlocks at start."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tracking_uri_or_default(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def setup_mlflow(tracking_uri: str | None, experiment: str, autolog: bool = True):
    offline_environment()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
    mlflow.set_experiment(experiment)
    if autolog:
        # Imported first so the teleprompter class exists when autolog patches Teleprompter subclasses.
        from . import persona  # noqa: F401

        mlflow.dspy.autolog(log_compiles=True, log_evals=True, log_traces=True, silent=True)
    return mlflow


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No MLflow trace of the LM calls in the block: work outside any user's run (where forgetting
    the user could not find it) must leave none. A failing tracking store changes nothing here."""
    if "mlflow" not in sys.modules:
        yield
        return
    import mlflow.tracing
    from mlflow.tracing.provider import is_tracing_enabled

    def quietly(call, default=None):
        try:
            return call()
        except Exception:  # tracking never stops the work
            return default

    was_enabled = quietly(is_tracing_enabled, False)
    quietly(mlflow.tracing.disable)
    try:
        yield
    finally:
        if was_enabled:
            quietly(mlflow.tracing.enable)


class Tracker:
    """One process's view of an MLflow experiment; every method is safe to call when MLflow fails."""

    def __init__(self, tracking_uri: str | None, experiment: str, autolog: bool = False,
                 attempts: int = 3, wait_s: float = 0.5):
        self.attempts, self.wait_s, self.experiment = attempts, wait_s, experiment
        self.errors: list[str] = []
        self.mlflow = self.attempt("set up MLflow", lambda: setup_mlflow(tracking_uri, experiment, autolog))
        if self.mlflow is not None:
            self.attempt("end runs of killed compiles", self._end_orphaned_runs)

    def attempt(self, what: str, call: Callable[[], Any]) -> Any:
        """`call()`, retried with backoff; None (and the error kept) when every attempt failed."""
        for attempt in range(self.attempts):
            try:
                return call()
            except Exception as exc:  # tracking must never stop the work
                if attempt == self.attempts - 1:
                    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                    self.errors.append(f"{what}: {type(exc).__name__}: {first_line}")
                    return None
                time.sleep(self.wait_s * 2 ** attempt)

    def call(self, what: str, method: str, *args, **kwargs) -> Any:
        """`mlflow.<method>(*args, **kwargs)` (a dotted `method` reaches a submodule's), contained."""
        if self.mlflow is None:
            return None
        return self.attempt(what, lambda: functools.reduce(getattr, method.split("."), self.mlflow)(*args, **kwargs))

    @contextlib.contextmanager
    def run(self, name: str, tags: dict | None = None, parent_run_id: str | None = None) -> Iterator[Any]:
        """An MLflow run around a block (None if it could not start); it ends FINISHED, FAILED on an
        error, KILLED on an interruption, and the block's own exceptions pass through."""
        tags = {**(tags or {}), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        run = self.call(f"start run {name!r}", "start_run", run_name=name, parent_run_id=parent_run_id,
                        nested=parent_run_id is not None, tags=tags)
        status = "FINISHED"
        try:
            yield run
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if run is not None:
                self._end(run.info.run_id, status)

    def _end(self, run_id: str, status: str) -> None:
        try:  # end_run leaves the active run first, then records the status: only the record is retried
            self.mlflow.end_run(status)
        except Exception:
            self.attempt(f"end run {run_id}", lambda: self.mlflow.MlflowClient().set_terminated(run_id, status))

    def _end_orphaned_runs(self) -> None:
        """Runs of this host still RUNNING whose process is gone were killed (kill -9, power loss)."""
        experiment = self.mlflow.get_experiment_by_name(self.experiment)
        client = self.mlflow.MlflowClient()
        host = socket.gethostname()
        for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            pid = run.data.tags.get(PID_TAG)
            if run.data.tags.get(HOST_TAG) == host and pid and pid.isdigit() and not _alive(int(pid)):
                client.set_terminated(run.info.run_id, "KILLED")


class Observer:
    """Events of a compile or an alignment; this one ignores them all."""

    def stage(self, name: str, seconds: float, ran: bool, metrics: dict[str, float] | None = None) -> None:
        """A stage of a user's compile finished (`ran`) or was resumed from its saved output."""

    def version(self, version: "PersonaVersion") -> None:
        """The optimizer made a version (not yet numbered)."""

    def saved(self, state: "ProgramState", added: list["PersonaVersion"]) -> None:
        """`added` entered the user's history, numbered, in the saved `state`."""

    def finished(self, status: str, metrics: dict[str, float], error: str = "") -> None:
        """The user's compile or alignment ended."""

    def started(self, params: dict) -> None:
        """A compile of many users started with these settings."""

    def population(self, model: dict, version: int) -> None:
        """A compile of many users fitted the population model (`PopulationModel.to_dict()`), in force as `version`."""

    def reported(self, report) -> None:
        """A compile of many users ended (a `CompileReport`)."""


class StageTimes(Observer):
    """Records each stage's seconds and logs nothing: for the compile's first pass, whose user's
    run opens in the second pass, which logs them there (`Observer.stage`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def stage(self, name, seconds, ran, metrics=None):
        if ran:
            self.seconds[name] = seconds


def prompt_name(user_id: str) -> str:
    """The user's prompt in MLflow's prompt registry, whose names allow letters, digits, '-', '_'
    and '.': the id's hash keeps apart two ids that read alike there."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", user_id).strip("-.")[:64] or "user"
    return f"persona.{readable}.{hashlib.sha256(user_id.encode()).hexdigest()[:16]}"


class PromptRegistry:
    """Each user's accepted persona versions as versions of one prompt in MLflow's registry (where
    MLflow users look for a prompt's versions and diffs), with the alias `champion` on the version
    in force: a rollback, which puts an earlier persona back in force as a new version, moves it.
    Contained by the `Tracker`, as every MLflow call."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def publish(self, state: "ProgramState", added: list["PersonaVersion"]) -> None:
        name = prompt_name(state.user_id)
        registered = self._registered(name)
        for version in [*(v for v in added if v.accepted), state.current]:
            if version.version in registered:
                continue
            tags = {PERSONA_VERSION_TAG: str(version.version), "user_id": state.user_id,
                    **{key: f"{value:.4f}" for key, value in (("validation_score", version.score),
                                                             ("validation_likelihood", version.likelihood))
                       if value is not None}}
            prompt = self.tracker.call("register a persona version", "genai.register_prompt", name,
                                       version.instructions.get("answer", ""),
                                       commit_message=version.note or f"persona v{version.version}", tags=tags)
            if prompt is not None:
                registered[version.version] = prompt.version
        if state.current.version in registered:
            self.tracker.call("move the champion alias", "genai.set_prompt_alias", name, CHAMPION,
                              registered[state.current.version])

    def _registered(self, name: str) -> dict[int, int]:
        """Persona version -> prompt version, for the user's versions already in the registry."""
        client = self.tracker.call("read the prompt registry", "MlflowClient")
        found = client and self.tracker.attempt(
            "read the prompt registry", lambda: client.get_prompt(name) and client.search_prompt_versions(name))
        return {int(v.tags[PERSONA_VERSION_TAG]): int(v.version) for v in found or []
                if v.tags.get(PERSONA_VERSION_TAG, "").isdigit()}


def registered_persona(user_id: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> tuple[str, int | None]:
    """The user's persona text under `alias` in the prompt registry, and the persona version of the
    store it was registered from (None for a version written in the registry itself)."""
    offline_environment()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri))
    try:  # uncached: a moved alias is read at once
        prompt = mlflow.genai.load_prompt(f"prompts:/{prompt_name(user_id)}@{alias}", link_to_model=False,
                                          cache_ttl_seconds=0)
    except Exception as exc:
        raise KeyError(f"no {alias} persona of user {user_id!r} in the prompt registry at "
                       f"{tracking_uri_or_default(tracking_uri)}") from exc
    if prompt.tags.get("user_id", user_id) != user_id:  # two ids whose names and hashes collide
        raise KeyError(f"the prompt {prompt_name(user_id)!r} belongs to another user")
    tag = prompt.tags.get(PERSONA_VERSION_TAG, "")
    return prompt.template, int(tag) if tag.isdigit() else None


class MlflowObserver(Observer):
    """Logs each event to the active MLflow run as it happens: a stage's time, a version's
    validation score (the run's chart fills in during the alignment), then the saved versions'
    texts, diffs and the run's description, and, with `register_prompts`, the accepted versions in
    the prompt registry. Every call is contained by the `Tracker`."""

    def __init__(self, tracker: Tracker, register_prompts: bool = False):
        self.tracker, self.step = tracker, 0
        self.prompts = PromptRegistry(tracker) if register_prompts else None

    def stage(self, name, seconds, ran, metrics=None):
        self.tracker.call("tag a stage", "set_tag", f"stage.{name}", "ran" if ran else "resumed")
        if ran:
            self.tracker.call("log a stage's time", "log_metrics", {f"seconds_{name}": seconds, **(metrics or {})})

    def version(self, version):
        if version.score is not None:
            self.tracker.call("log a validation score", "log_metric", "validation_score", version.score, step=self.step)
        if version.likelihood is not None:
            self.tracker.call("log a validation likelihood", "log_metric", "validation_likelihood", version.likelihood,
                              step=self.step)
        self.step += 1

    def saved(self, state, added):
        for version in added:
            name = f"personas/v{version.version:03d}"
            self.tracker.call("log a persona version", "log_text", version.instructions.get("answer", ""), f"{name}.md")
            self.tracker.call("log a persona version", "log_dict", asdict(version), f"{name}.json")
            position = state.versions.index(version)
            if position:
                before = state.versions[position - 1]
                # Markdown, so the UI's artifact view renders it (it does not preview a .diff file).
                self.tracker.call("log a persona diff", "log_text", f"```diff\n{version.diff(before)}\n```\n",
                                  f"{name}.diff.md")
        self.tracker.call("log the persona", "log_text", state.current.instructions.get("answer", ""), "persona.md")
        self.tracker.call("describe the run", "set_tag", "mlflow.note.content", describe(state))
        if self.prompts:
            self.prompts.publish(state, added)

    def finished(self, status, metrics, error=""):
        # Traces are exported in the background: stored before the user counts as done.
        self.tracker.call("store the traces", "flush_trace_async_logging")
        # Costs and error before the status: a compile killed in between leaves no run tagged with
        # its status without them.
        self.tracker.call("log costs", "log_metrics", metrics)
        if error:
            self.tracker.call("log the error", "log_text", error, "error.txt")
        self.tracker.call("tag the status", "set_tag", "status", status)


    def started(self, params):
        self.tracker.call("log the config", "log_params", params)

    def population(self, model, version):
        self.tracker.call("log the population model", "log_dict", {"version": version, **model},
                          f"population/v{version:03d}.json")
        self.tracker.call("log the population model", "log_metrics", {
            "population_version": version, "population_users": model["users"], "population_items": model["items"],
            "population_strength": model["strength"],
            **{f"population_weight_{name}":
               sum(fold["weights"].get(name, 0.0) for fold in model["folds"]) / len(model["folds"])
               for name in sorted({n for fold in model["folds"] for n in fold["weights"]})},
            **_text_effect_metrics(model.get("text_effects") or [])})

    def reported(self, report):
        results = report.results
        self.tracker.call("log the counts", "log_metrics", {f"users_{k}": v for k, v in report.counts.items()})
        self.tracker.call("log the users' table", "log_table", {
            "user": [r.user_id for r in results], "status": [r.status for r in results],
            "validation_before": [r.scores[0] if r.scores else None for r in results],
            "validation_after": [r.score_after for r in results]}, "users.json")
        done = [r for r in results if r.status == "compiled"]
        if done:
            self.tracker.call("log the means", "log_metrics", {
                "mean_lm_calls_per_user": sum(r.lm_calls for r in done) / len(done),
                "mean_seconds_per_user": sum(r.seconds for r in done) / len(done)})


def _text_effect_metrics(effects: list[dict]) -> dict[str, float]:
    """A computed text's paired wins and losses over all users' windows (each fold's effect counts
    every user but its own fold's, so each user is in all folds' sums but one)."""
    if len(effects) < 2:
        return {}
    return {f"population_text_{outcome}": sum(e[outcome] for e in effects) / (len(effects) - 1)
            for outcome in ("wins", "losses")}


def seconds_metrics(timings: dict[str, float]) -> dict[str, float]:
    """Where the time went, as metrics: `seconds_<phase>`."""
    return {f"seconds_{phase}": s for phase, s in timings.items()}


def describe(state: "ProgramState") -> str:
    """The run's description in the MLflow UI: every version with its validation score and what
    became of it, then what the persona in force changed from the first one."""
    score = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"**{state.user_id}**: v{state.current.version} in force", ""]
    lines += [f"- v{v.version}: {'accepted' if v.accepted else 'rejected'}, validation score {score(v.score)}"
              f"{f' ({v.note})' if v.note else ''}" for v in state.versions]
    first = state.versions[0]
    if state.current.version != first.version:
        lines += ["", f"What v{state.current.version} changed from v{first.version}:",
                  "```diff", state.current.diff(first), "```"]
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_user(user_id: str, tracking_uri: str | None = None) -> int:
    """Delete everything MLflow holds of one user: their runs (tagged `user_id`) in every experiment,
    with their metrics, parameters, artifacts and the traces recorded under them, permanently (not
    MLflow's soft delete), and their prompt in the registry with all its versions. Returns the
    number of runs and prompts deleted.

    A SQLite tracking database is vacuumed afterwards, so no deleted text stays in its free pages.
    This reaches the tracking server and artifact store the URI names; copies elsewhere (a remote
    server's backups, an exported trace) are the operator's to delete.
    """
    offline_environment()
    import mlflow
    from mlflow.artifacts import get_artifact_repository
    from mlflow.entities import ViewType
    from mlflow.tracking._tracking_service.utils import _get_store

    uri = tracking_uri_or_default(tracking_uri)
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return 0  # nothing was ever tracked there (and connecting would create the database)
    mlflow.flush_trace_async_logging()  # traces this process is still exporting are deleted too
    client = mlflow.MlflowClient(uri)
    escaped = user_id.replace("\\", "\\\\").replace("'", "\\'")
    deleted = 0
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        runs = client.search_runs([experiment.experiment_id], f"tags.user_id = '{escaped}'", ViewType.ALL,
                                  max_results=50000)
        for run in runs:
            run_id = run.info.run_id
            while traces := client.search_traces(locations=[experiment.experiment_id], run_id=run_id, max_results=100):
                for trace in traces:  # a trace MLflow wrote as an artifact outlives its database row
                    location = trace.info.tags.get("mlflow.artifactLocation")
                    if location:
                        with contextlib.suppress(Exception):
                            get_artifact_repository(location).delete_artifacts()
                client.delete_traces(experiment.experiment_id, trace_ids=[t.info.trace_id for t in traces])
            with contextlib.suppress(Exception):  # a run without artifacts has no folder to delete
                get_artifact_repository(run.info.artifact_uri).delete_artifacts()
            store = _get_store(uri)
            if hasattr(store, "_hard_delete_run"):
                store._hard_delete_run(run_id)
            else:  # a remote server: its own garbage collection (`mlflow gc`) removes deleted runs
                client.delete_run(run_id)
            deleted += 1
    if _forget_prompt(client, user_id):
        deleted += 1
    if deleted and uri.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as db:
            db.execute("VACUUM")
    return deleted


def _forget_prompt(client, user_id: str) -> bool:
    """Delete the user's prompt and every version of it (its aliases go with them)."""
    name = prompt_name(user_id)
    if client.get_prompt(name) is None:
        return False
    for version in client.search_prompt_versions(name):
        client.delete_prompt_version(name, str(version.version))
    client.delete_prompt(name)
    return True
