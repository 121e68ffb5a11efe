"""Where the users of a compile run. An engine runs the same per-user function (`compile_user`, a
pure function of one user's data and the config) over every user and yields the results as they
finish, so progress and resume work the same on each:

- `LocalEngine`: in this process (which may pass an LM object), or in worker processes on this
  machine, each loading its own model (one llama.cpp context is not thread-safe);
- `RayEngine`: actors on a Ray cluster (the `ray` extra), each loading its model once and then
  compiling user after user; an actor that dies is restarted and its user retried. Artifacts go to
  the store path (shared storage on a cluster), tracking to the tracking URI (an MLflow server).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable, Iterator, Protocol

import dspy

from ..program.lm import make_lm

CompileOne = Callable[..., Any]  # compile_user(store, task, user row, config, parent_run_id, tracking_uri, lm=None)


class Engine(Protocol):
    name: str

    def run(self, compile_one: CompileOne, jobs: list[tuple]) -> Iterator[Any]: ...


@dataclass
class LocalEngine:
    workers: int = 1
    lm: dspy.LM | None = None  # an LM object: this process only (it is not picklable)
    name = "local"

    def run(self, compile_one: CompileOne, jobs: list[tuple]) -> Iterator[Any]:
        if self.workers <= 1 or self.lm is not None:
            for job in jobs:
                yield compile_one(*job, lm=self.lm)
            return
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(compile_one, *job) for job in jobs]):
                yield future.result()


@dataclass
class RayEngine:
    address: str | None = None  # None: a local Ray instance; "auto" or "ray://host:port": a cluster
    workers: int = 2
    max_retries: int = 3  # restarts of a dead actor, and retries of the user it was compiling
    name = "ray"

    def run(self, compile_one: CompileOne, jobs: list[tuple]) -> Iterator[Any]:
        import ray
        from ray.util import ActorPool

        ray.init(address=self.address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        worker = ray.remote(max_restarts=self.max_retries, max_task_retries=self.max_retries)(CompileWorker)
        pool = ActorPool([worker.remote(compile_one) for _ in range(self.workers)])
        yield from pool.map_unordered(lambda actor, job: actor.compile.remote(*job), jobs)


class CompileWorker:
    """A Ray actor: the LM of each config it is given, loaded once, then user after user."""

    def __init__(self, compile_one: CompileOne):
        self.compile_one = compile_one
        self.lms: dict[tuple[str, str | None], dspy.LM] = {}

    def compile(self, *job):
        config = job[3]
        where = (config.lm, config.api_base)
        if where not in self.lms:
            self.lms[where] = make_lm(config.lm, api_base=config.api_base)
        return self.compile_one(*job, lm=self.lms[where])
