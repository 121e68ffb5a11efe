"""The same compile on a local Ray cluster as on this machine's processes: the same artifacts; a
worker that dies is replaced and its user compiled on retry."""

import os
import sys
from pathlib import Path

import pytest

from personaagent.data import SAMPLE_DIR, load
from personaagent.data.tasks import task_to_dict
from personaagent.optimizers.compile import compile_user, compile_users
from personaagent.optimizers.engines import LocalEngine, RayEngine
from personaagent.optimizers.pipeline import CompileConfig
from personaagent.program.lm import FAKE_LM
from personaagent.program.store import UserStore

ray = pytest.importorskip("ray")


def _artifacts(root) -> dict:
    """Each user's versions as compiled, without the times they were written at."""
    store = UserStore(root, embedder=object())
    return {user: [(v.version, v.persona, v.instructions, v.score, v.likelihood, v.accepted, v.note)
                   for v in store.load_state(user).versions] for user in store.users()}


def test_ray_compiles_the_same_artifacts_as_local_processes(tmp_path):
    data = load(SAMPLE_DIR / "LaMP-3-amazon")
    config = CompileConfig(lm=FAKE_LM)  # deterministic, and reachable by name from any process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = compile_users(data, tmp_path / "local", config, tracking_uri=uri, progress=False, engine=LocalEngine(2))
    try:
        on_ray = compile_users(data, tmp_path / "ray", config, tracking_uri=uri, progress=False,
                               engine=RayEngine(workers=2))
    finally:
        ray.shutdown()
    assert local.counts == on_ray.counts == {"compiled": len(data.users), "skipped": 0, "failed": 0}
    assert _artifacts(tmp_path / "ray") == _artifacts(tmp_path / "local") and len(_artifacts(tmp_path / "local")) == len(data.users)


def _crash_once(*job, lm=None):
    """compile_user, but the worker process dies the first time it meets the first user."""
    user_id = job[2]["user_id"]  # a row of the users' dataset
    marker = Path(job[0]) / f"crashed-{user_id}"
    if user_id == "A15TYOEWBQYF0X" and not marker.exists():
        marker.write_text("the worker died here")
        os._exit(1)
    return compile_user(*job, lm=lm)


def test_a_killed_ray_worker_is_restarted_and_its_user_compiled_on_retry(tmp_path):
    data = load(SAMPLE_DIR / "LaMP-3-amazon")
    store = tmp_path / "store"
    store.mkdir()
    jobs = [(str(store), task_to_dict(data.task), row, CompileConfig(lm=FAKE_LM), None, None) for row in data.dataset]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    try:
        results = list(RayEngine(workers=1).run(_crash_once, jobs))
    finally:
        ray.shutdown()
    assert (store / "crashed-A15TYOEWBQYF0X").exists()
    assert sorted(r.user_id for r in results if r.status == "compiled") == sorted(data.users)


def test_eval_compiles_its_rows_on_ray_with_the_same_answers(tmp_path):
    """`personaagent eval --engine ray`: the compiled rows are compiled by Ray actors, as `compile`'s."""
    from personaagent.experiments.eval import Evaluation

    data = load(SAMPLE_DIR / "LaMP-3-amazon").select(2)
    answers = {}
    try:
        for name, engine in (("in-process", None), ("ray", RayEngine(workers=1))):
            evaluation = Evaluation(data, tmp_path / name, FAKE_LM, CompileConfig(lm=FAKE_LM), 1,
                                    tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", engine=engine)
            rows = evaluation.run_method("persona")
            assert all(r["compile"]["status"] == "compiled" for r in rows), rows
            answers[name] = [(r["user_id"], a["pred"]) for r in rows for a in r["answers"]]
    finally:
        ray.shutdown()
    assert answers["ray"] == answers["in-process"] and len(answers["ray"]) == 2
