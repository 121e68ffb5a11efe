"""The same compile on a local Ray cluster as on this machine's processes: the same artifacts."""

import pytest

from personaagent.data import SAMPLE_DIR, load
from personaagent.optimizers.compile import CompileConfig, compile_users
from personaagent.optimizers.engines import LocalEngine, RayEngine
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
