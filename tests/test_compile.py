import mlflow
import pytest

from personaagent.data import SAMPLE_DIR, load
from personaagent.optimizers.compile import CompileConfig, compile_users
from personaagent.program.store import UserStore

from conftest import fake_lm

ANSWERS = {"tools": ["answer_habits"], "answer": "5", "summary": "Rates guitar gear generously and often.",
           "preferences": ["likes durable strings"], "notes": ["gave 5"], "gradient": "Lean towards 5.",
           "rules": ["when in doubt answer 5"]}


@pytest.fixture
def data():
    return load(SAMPLE_DIR / "LaMP-3-amazon").select(2)


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["personaagent-compile"], output_format="list")


def test_compile_saves_versions_logs_runs_and_skips_unchanged_users(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(ANSWERS))
    assert report.counts == {"compiled": 2, "skipped": 0, "failed": 0}
    assert all(r.lm_calls == 1 + 2 * 3 + 2 for r in report.results)  # profile, replay, critique, rewrite
    store = UserStore(tmp_path / "store")
    state = store.load_state(report.results[0].user_id)
    assert [v.version for v in state.versions] == [1, 2] and state.current.version == 2
    assert "Rates guitar gear generously" in state.current.instructions["answer"]
    runs = _runs(uri)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["user_id"] for r in children} == set(data.users)
    assert parent.data.params["n_recent"] == "3" and parent.data.metrics["users_compiled"] == 2

    again = compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(ANSWERS))
    assert again.counts["skipped"] == 2
    changed = compile_users(data, tmp_path / "store", CompileConfig(iterations=2), tracking_uri=uri, progress=False,
                            lm=fake_lm(ANSWERS))
    assert changed.counts["compiled"] == 2
    assert len(store.load_state(report.results[0].user_id).versions) == 4  # earlier versions are kept


def test_a_failing_lm_fails_users_without_stopping_the_run_or_losing_the_last_persona(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(ANSWERS))
    user = next(iter(data.users))
    before = UserStore(tmp_path / "store").load_state(user).current.instructions
    report = compile_users(data, tmp_path / "store", CompileConfig(iterations=3), tracking_uri=uri, progress=False,
                           lm=fake_lm(fail=True))
    assert report.counts["failed"] == 2 and report.all_failed
    assert "fake LM is unreachable" in report.results[0].error
    assert UserStore(tmp_path / "store").load_state(user).current.instructions == before


def test_gepa_and_no_optimizer(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gepa = compile_users(data, tmp_path / "gepa", CompileConfig(optimizer="gepa", gepa_budget=6), tracking_uri=uri,
                         progress=False, lm=fake_lm({**ANSWERS, "new_instruction": "Answer 5 for this user."}))
    assert gepa.counts["compiled"] == 2, [r.error for r in gepa.results]
    state = UserStore(tmp_path / "gepa").load_state(gepa.results[0].user_id)
    assert state.current.note == "gepa" and state.current.instructions
    plain = compile_users(data, tmp_path / "none", CompileConfig(optimizer="none"), tracking_uri=uri, progress=False,
                          lm=fake_lm(ANSWERS))
    assert all(r.lm_calls == 1 for r in plain.results)  # the profile only
    assert len(UserStore(tmp_path / "none").load_state(plain.results[0].user_id).versions) == 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'magic'"):
        CompileConfig(optimizer="magic")
    with pytest.raises(ValueError, match="at least 1"):
        CompileConfig(n_recent=0)
