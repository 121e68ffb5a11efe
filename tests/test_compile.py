import json
from pathlib import Path

import mlflow
import pytest

from personaagent.data import SAMPLE_DIR, load
from personaagent.optimizers.compile import compile_users
from personaagent.optimizers.pipeline import CompileConfig
from personaagent.program.store import UserStore
from personaagent.program.testing import fake_lm


STEADY, VARIED = "A15TYOEWBQYF0X", "A22Z554ZQ8NFPC"  # latest ratings 5, 5, 5 and 5, 5, 4
RULE = "rate each review as its text says"


@pytest.fixture
def data():
    return load(SAMPLE_DIR / "LaMP-3-amazon").select(user_ids=[STEADY, VARIED])


def answers(data) -> dict:
    """The fake LM writes the profile and the rewrite, and rates 4, or the user's real rating once the
    persona carries the rewritten rule: only a rewrite can then score better on the validation window."""
    real = {r.input: r.output for user in data.users.values() for r in user.replays}

    def rating(prompt: str) -> str:
        question = prompt.split("[[ ## question ## ]]")[-1].split("[[ ## ")[0].strip()
        return real.get(question, "4") if RULE in prompt else "4"

    return {"summary": "Rates guitar gear generously and often.", "preferences": ["likes durable strings"],
            "notes": ["gave 5"], "gradient": "Read each review before rating it.", "rules": [RULE], "answer": rating}


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["personaagent-compile"], output_format="list")


def test_compile_saves_versions_logs_runs_and_skips_unchanged_users(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    assert report.counts == {"compiled": 2, "skipped": 0, "failed": 0}
    calls = {r.user_id: r.lm_calls for r in report.results}
    # Profile, validation window, replays (the history the population model learns from); the
    # adaptation needs no LM call, and for the steady user it gets every replay right: no loss, no
    # reflection. The varied user also gets the reflection and the rewrite's validation.
    assert calls == {STEADY: 1 + 3 + 3, VARIED: 1 + 3 + 3 + 1 + 3}
    store = UserStore(tmp_path / "store")
    population = store.load_population()
    assert population["version"] == 1 and population["model"]["users"] == 2 and population["model"]["items"] == 12
    steady, varied = store.load_state(STEADY), store.load_state(VARIED)
    assert [v.note.split(":")[0] for v in steady.versions] == ["initial persona", "evidence weights and label offsets"]
    assert steady.current.version == 2 and steady.current.persona.weights and steady.current.persona.bias
    assert steady.current.score > steady.versions[0].score
    # The fake LM rates 4 whatever the review says until the rewrite: the population learned not to
    # trust it, so the rewrite changes no answer and is not kept.
    assert [v.version for v in varied.versions] == [1, 2, 3] and varied.current.version == 2
    rewrite = varied.versions[2]
    assert not rewrite.accepted and RULE in rewrite.instructions["answer"] and "sign test" in rewrite.note
    runs = _runs(uri)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    children = {r.data.tags["user_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(data.users)
    assert parent.data.params["n_recent"] == "3" and parent.data.params["acceptance"] == "validated"
    assert parent.data.metrics["users_compiled"] == 2 and parent.data.metrics["population_version"] == 1
    metrics = children[VARIED].data.metrics
    assert metrics["validation_score"] == rewrite.score and metrics["validation_likelihood"] == rewrite.likelihood
    assert {"seconds_validation", "seconds_adaptation", "seconds_reflection"} <= set(metrics)
    # The first pass (up to the answered history) ran before the user's run opened: its time is there too.
    assert {"seconds_ingest", "seconds_profile", "seconds_history"} <= set(metrics) and metrics["seconds_history"] > 0
    assert children[VARIED].data.tags["stage.history"] == "ran"
    assert "seconds_reflection" not in children[STEADY].data.metrics
    # The UI shows what changed: each version's diff, the run's description, the users' table.
    client = mlflow.MlflowClient(uri)
    diff = Path(client.download_artifacts(children[VARIED].info.run_id, "personas/v003.diff.md", str(tmp_path))).read_text()
    assert f"+- {RULE}" in diff and "--- v2" in diff
    description = children[VARIED].data.tags["mlflow.note.content"]
    assert "v2 in force" in description and "- v3: rejected" in description
    model = json.loads(Path(client.download_artifacts(parent.info.run_id, "population/v001.json", str(tmp_path))).read_text())
    assert model["version"] == 1 and len(model["folds"]) == 5
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "users.json", str(tmp_path))).read_text())
    rows = dict(zip((c for c in table["columns"]), zip(*table["data"])))
    assert dict(zip(rows["user"], rows["validation_after"]))[VARIED] == varied.current.score

    again = compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    assert again.counts["skipped"] == 2
    changed = compile_users(data, tmp_path / "store", CompileConfig(iterations=2), tracking_uri=uri, progress=False,
                            lm=fake_lm(answers(data)))
    assert changed.counts["compiled"] == 2
    recompiled = store.load_state(VARIED).versions
    assert recompiled[:3] == varied.versions and len(recompiled) > 3  # earlier versions are kept


def test_a_setting_no_stage_reads_recompiles_no_one(tmp_path, data):
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "store"
    compile_users(data, store, CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    # max_versions only bounds the history kept at the next save; a persona carries its own k.
    again = compile_users(data, store, CompileConfig(max_versions=5, k=2), tracking_uri=uri, progress=False,
                          lm=fake_lm(fail=True))
    assert again.counts["skipped"] == 2 and all(r.stages_run == [] for r in again.results)


def test_a_rerun_resumes_at_the_first_stage_whose_inputs_changed(tmp_path, data, monkeypatch):
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "store"

    def compile_with(config, lm):
        return compile_users(data, store, config, tracking_uri=uri, progress=False, lm=lm)

    first = compile_with(CompileConfig(), fake_lm(answers(data)))
    assert all(r.stages_run == ["ingest", "profile", "history", "align", "save"] for r in first.results)
    # A new alignment setting: the memory and the profile are reused, so no profile call.
    changed = compile_with(CompileConfig(validation=2), fake_lm(answers(data)))
    assert all(r.stages_run == ["history", "align", "save"] for r in changed.results)
    # A window of 2 can never pass the sign test: no reflection is written for it.
    assert {r.user_id: r.lm_calls for r in changed.results} == {STEADY: 2 + 3, VARIED: 2 + 3}
    kept = {user: len(UserStore(store).load_state(user).versions) for user in data.users}

    # Killed while saving: the aligned versions were saved by their own stage, so the rerun only
    # saves them, with an LM that could not have aligned anything; and records them once.
    def killed(*_):
        raise KeyboardInterrupt

    varied = data.select(user_ids=[VARIED])
    monkeypatch.setattr(UserStore, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        compile_users(varied, store, CompileConfig(validation=1), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    monkeypatch.undo()
    assert len(UserStore(store).load_state(VARIED).versions) == kept[VARIED]
    resumed = compile_users(varied, store, CompileConfig(validation=1), tracking_uri=uri, progress=False, lm=fake_lm(fail=True))
    assert resumed.counts["compiled"] == 1 and resumed.results[0].stages_run == ["save"]
    after = UserStore(store).load_state(VARIED).versions
    assert len(after) > kept[VARIED]
    again = compile_users(varied, store, CompileConfig(validation=1), tracking_uri=uri, progress=False, lm=fake_lm(fail=True))
    assert again.counts["skipped"] == 1 and UserStore(store).load_state(VARIED).versions == after

    # Killed after the program was saved but before its stage was logged: the program names the
    # inputs it was saved from, so the rerun skips, and nothing is recorded twice.
    log_stages = UserStore.save_stage_log

    def killed_after_saving(self, user_id, log):
        logging_the_save = log.get("save", {}).get("key") != self.stage_log(user_id).get("save", {}).get("key")
        if logging_the_save and log["save"]["key"] == log["align"]["key"]:
            raise KeyboardInterrupt
        log_stages(self, user_id, log)

    monkeypatch.setattr(UserStore, "save_stage_log", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        compile_users(varied, store, CompileConfig(validation=3), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    monkeypatch.undo()
    saved = UserStore(store).load_state(VARIED).versions
    assert len(saved) > len(after)
    rerun = compile_users(varied, store, CompileConfig(validation=3), tracking_uri=uri, progress=False, lm=fake_lm(fail=True))
    assert rerun.counts["skipped"] == 1 and UserStore(store).load_state(VARIED).versions == saved


def test_a_failing_lm_fails_users_without_stopping_the_run_or_losing_the_last_persona(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    compile_users(data, tmp_path / "store", CompileConfig(), tracking_uri=uri, progress=False, lm=fake_lm(answers(data)))
    before = UserStore(tmp_path / "store").load_state(VARIED).current
    assert before.version == 2 and before.persona.weights  # the adapted persona, which must survive
    report = compile_users(data, tmp_path / "store", CompileConfig(iterations=3), tracking_uri=uri, progress=False,
                           lm=fake_lm(fail=True))
    assert report.counts["failed"] == 2 and report.all_failed
    assert "fake LM is unreachable" in report.results[0].error
    assert UserStore(tmp_path / "store").load_state(VARIED).current == before


def test_a_user_whose_alignment_fails_still_has_their_first_pass_times_in_their_run(tmp_path, data, monkeypatch):
    import personaagent.optimizers.compile as compile_module

    def failing_align(*args, **kwargs):
        raise RuntimeError("alignment broke")

    monkeypatch.setattr(compile_module, "align", failing_align)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = compile_users(data.select(user_ids=[VARIED]), tmp_path / "store", CompileConfig(), tracking_uri=uri,
                           progress=False, lm=fake_lm(answers(data)))
    assert report.counts["failed"] == 1 and "alignment broke" in report.results[0].error
    run = next(r for r in _runs(uri) if r.data.tags.get("user_id") == VARIED)
    assert run.data.tags["status"] == "failed" and run.data.metrics["seconds_history"] > 0


def test_gepa_and_no_optimizer(tmp_path, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # GEPA's reflection proposes the rule, the one instruction that rates better: it learns only from
    # the label answers' traces, so a kept rule shows GEPA saw them.
    gepa = compile_users(data, tmp_path / "gepa", CompileConfig(optimizer="gepa", gepa_budget=6), tracking_uri=uri,
                         progress=False, lm=fake_lm({**answers(data), "new_instruction": f"Answer as the user: {RULE}."}))
    assert gepa.counts["compiled"] == 2, [r.error for r in gepa.results]
    state = UserStore(tmp_path / "gepa").load_state(VARIED)
    assert state.current.note == "gepa" and RULE in state.current.instructions["answer"]
    plain = compile_users(data, tmp_path / "unaligned", CompileConfig(optimizer="unaligned"), tracking_uri=uri,
                          progress=False, lm=fake_lm(answers(data)))
    assert all(r.lm_calls == 1 for r in plain.results)  # the profile only
    assert len(UserStore(tmp_path / "unaligned").load_state(plain.results[0].user_id).versions) == 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'magic'"):
        CompileConfig(optimizer="magic")
    with pytest.raises(ValueError, match="at least 1"):
        CompileConfig(n_recent=0)
    with pytest.raises(ValueError, match="at least 1"):
        CompileConfig(max_lm_calls=0)
    with pytest.raises(ValueError, match="validation must be at least 0"):
        CompileConfig(validation=-1)


def test_an_unknown_acceptance_is_refused_when_configured():
    with pytest.raises(ValueError, match="unknown acceptance 'guarded'"):
        CompileConfig(acceptance="guarded")


def test_a_headline_compile_writes_no_profile_its_program_never_reads(tmp_path, headline_data):
    """A styled text's persona shows no profile and computes its text from past headlines: the
    compile answers the window plainly and under the style text, and spends no call on a profile."""
    report = compile_users(headline_data, tmp_path / "store", CompileConfig(), progress=False,
                           lm=fake_lm({"title": "Events Happen: A Look"}))
    assert report.counts["compiled"] == 1, [r.error for r in report.results]
    assert report.results[0].lm_calls == 3 + 3  # the window, then the window under the style text
    assert not (UserStore(tmp_path / "store").user_dir("hana") / "profile.json").exists()
