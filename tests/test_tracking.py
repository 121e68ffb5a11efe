"""Tracking observes and never stops the work; compiles of one user never lose a version; forgetting
a user leaves none of their text in anything the project wrote (the store, MLflow's database and
artifacts)."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from personaagent.data.loaders import load
from personaagent.optimizers.compile import compile_users
from personaagent.optimizers.pipeline import CompileConfig
from personaagent.optimizers.tracking import HOST_TAG, PID_TAG, MlflowObserver, Tracker, prompt_name, registered_persona
from personaagent.app.cli import main
from personaagent.program.lm import make_lm
from personaagent.app import service as service_module
from personaagent.app.service import PersonaService
from personaagent.program.store import UserStore
from personaagent.program.testing import fake_lm


SECRETS = {"alice": "ZEBRA-MARMALADE-4471", "bob": "OKAPI-TURPENTINE-9902"}


@pytest.fixture
def log(tmp_path):
    """Two users whose every interaction carries their secret, as a JSONL rating log."""
    path = tmp_path / "log.jsonl"
    rows = [{"user_id": user, "timestamp": t, "input": f"review {t} by {user}: {secret} strings held up well",
             "output": str(4 + t % 2)} for user, secret in SECRETS.items() for t in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return load(path, "rating")


def _fake():
    return fake_lm({"summary": "Rates strings.", "gradient": "Rate 5.", "rules": ["rate 5"], "answer": "4"})


def _files_with(root: Path, text: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_forgetting_leaves_no_byte_of_the_user_in_the_store_or_mlflow(tmp_path, log, monkeypatch):
    tmp_path = tmp_path / "written"  # everything the project writes, and nothing else (not the input log)
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go under the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The paper's acceptance: every loss is reflected on, so each user's text reaches their run's traces.
    report = compile_users(log, tmp_path / "store", CompileConfig(acceptance="always"), tracking_uri=uri, progress=False,
                           lm=_fake())
    assert report.counts["compiled"] == 2 and not report.tracking_errors
    for secret in SECRETS.values():  # the compile's traces carried each user's text into MLflow
        assert "mlflow.db" in _files_with(tmp_path, secret) and any(f.startswith("store") for f in _files_with(tmp_path, secret))

    assert main(["forget", "--store", str(tmp_path / "store"), "--user", "alice", "--tracking-uri", uri]) == 0
    assert _files_with(tmp_path, SECRETS["alice"]) == []
    assert "mlflow.db" in _files_with(tmp_path, SECRETS["bob"])  # only alice was forgotten

    with PersonaService(tmp_path / "store", lm=_fake(), tracking_uri=uri) as service:
        service.delete("bob")
    assert _files_with(tmp_path, SECRETS["bob"]) == []
    mlflow.set_tracking_uri(uri)
    users = {r.data.tags.get("user_id") for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert users == {None}  # the parent run stays: it holds no user's text


def test_a_failing_tracking_sink_is_reported_and_every_user_is_still_compiled(tmp_path, log):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the tracking database's folder should be")
    report = compile_users(log, tmp_path / "store", CompileConfig(), tracking_uri=f"sqlite:///{blocked}/mlflow.db",
                           progress=False, lm=_fake())
    assert report.counts["compiled"] == 2 and report.run_id is None
    assert report.tracking_errors and all(r.tracking_errors for r in report.results)
    store = UserStore(tmp_path / "store")
    assert {u: store.load_state(u).current.version >= 1 for u in SECRETS} == {"alice": True, "bob": True}


def test_runs_end_failed_or_killed_and_runs_of_a_killed_process_are_ended(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "runs")
    with pytest.raises(RuntimeError), tracker.run("fails") as failed:
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), tracker.run("interrupted") as interrupted:
        raise KeyboardInterrupt
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client = mlflow.MlflowClient(uri)
    orphan = client.create_run(client.get_experiment_by_name("runs").experiment_id,
                               tags={HOST_TAG: __import__("socket").gethostname(), PID_TAG: dead.stdout.strip()})
    alive = client.create_run(orphan.info.experiment_id, tags={HOST_TAG: __import__("socket").gethostname(),
                                                               PID_TAG: str(__import__("os").getpid())})
    Tracker(uri, "runs")  # the next compile's tracker ends what a kill -9 left running
    status = {name: client.get_run(run.info.run_id).info.status
              for name, run in [("failed", failed), ("interrupted", interrupted), ("orphan", orphan), ("alive", alive)]}
    assert status == {"failed": "FAILED", "interrupted": "KILLED", "orphan": "KILLED", "alive": "RUNNING"}


def test_a_run_killed_while_it_records_the_users_result_is_never_tagged_done_without_its_costs(tmp_path, monkeypatch):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "runs")
    calls = []
    record = Tracker.call

    def killed_after_one_write(self, what, method, *args, **kwargs):
        if method in {"set_tag", "log_metrics"}:
            if calls:
                raise KeyboardInterrupt  # the kill -9 lands between the two writes
            calls.append(method)
        return record(self, what, method, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt), tracker.run("user") as run:
        monkeypatch.setattr(Tracker, "call", killed_after_one_write)
        MlflowObserver(tracker).finished("compiled", {"lm_calls": 3, "tokens": 40, "seconds": 1.0})
    stored = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.info.run_id).data
    assert "status" not in stored.tags and stored.metrics["lm_calls"] == 3


def test_two_compiles_of_one_user_at_once_lose_no_version_on_a_fresh_mlflow_store(tmp_path, log):
    one = log.select(user_ids=["alice"])
    configs = [CompileConfig(), CompileConfig(acceptance="always")]
    # Reference: the same two compiles one after the other.
    for config in configs:
        compile_users(one, tmp_path / "sequential", config, tracking_uri=f"sqlite:///{tmp_path / 'seq.db'}",
                      progress=False, lm=_fake())
    expected = len(UserStore(tmp_path / "sequential").load_state("alice").versions)

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    reports = [None, None]

    def run(i):
        reports[i] = compile_users(one, tmp_path / "store", configs[i], tracking_uri=uri, progress=False, lm=_fake())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.counts["compiled"] for r in reports] == [1, 1]
    versions = UserStore(tmp_path / "store").load_state("alice").versions
    assert [v.version for v in versions] == list(range(1, expected + 1))  # the second built on the first
    assert [v.note for v in versions].count("initial persona") == 1


def test_lms_are_uncached_unless_asked():
    # DSPy's cache would keep users' prompts on disk after they are forgotten.
    assert make_lm("openai/any-model").cache is False and make_lm("openai/any-model", cache=True).cache is True


def test_registered_personas_load_by_alias_follow_a_rollback_and_are_forgotten(tmp_path, log):
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "store"
    compile_users(log, store, CompileConfig(acceptance="always", register_prompts=True), tracking_uri=uri,
                  progress=False, lm=_fake())
    state = UserStore(store).load_state("alice")
    client = mlflow.MlflowClient(uri)
    registered = {int(v.tags["persona_version"]): v for v in client.search_prompt_versions(prompt_name("alice"))}
    assert set(registered) == {v.version for v in state.versions if v.accepted}
    assert all(registered[v.version].tags.get("validation_score") == f"{v.score:.4f}"
               for v in state.versions if v.accepted and v.score is not None)
    assert registered_persona("alice", tracking_uri=uri) == (state.current.instructions["answer"], state.current.version)

    first = state.versions[0]
    with PersonaService(store, lm=_fake(), tracking_uri=uri, register_prompts=True, persona_alias="champion") as service:
        assert service.program("alice").instructions == state.current.instructions["answer"]
        restored = service.rollback("alice", first.version)["current_version"]
        assert registered_persona("alice", tracking_uri=uri) == (first.instructions["answer"], restored)  # the alias moved
    # A text written in the registry itself (as in MLflow's UI) and put in force by the alias.
    mlflow.set_tracking_uri(uri)
    edited = mlflow.genai.register_prompt(prompt_name("alice"), "Answer as Alice would: generously.")
    mlflow.genai.set_prompt_alias(prompt_name("alice"), "champion", edited.version)
    with PersonaService(store, lm=_fake(), tracking_uri=uri, persona_alias="champion") as service:
        assert service.program("alice").instructions == "Answer as Alice would: generously."
        assert service.answer("alice", "review: strings held up well").persona_version == restored
        service.delete("alice")
    assert client.get_prompt(prompt_name("alice")) is None
    assert client.get_prompt(prompt_name("bob")) is not None  # only alice was forgotten
    with pytest.raises(KeyError, match="no champion persona"):
        registered_persona("alice", tracking_uri=uri)
    # No version under an alias (or no registry in reach): the store's persona in force, not an error.
    with PersonaService(store, lm=_fake(), tracking_uri=uri, persona_alias="staging") as service:
        bob = UserStore(store).load_state("bob").current
        assert (service.program("bob").instructions, service.persona("bob")["current_version"]) == (
            bob.instructions["answer"], bob.version)


def test_a_served_persona_is_read_again_from_the_registry_and_rebuilt_only_when_its_alias_moved(
        tmp_path, log, monkeypatch):
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "store"
    compile_users(log, store, CompileConfig(acceptance="always", register_prompts=True), tracking_uri=uri,
                  progress=False, lm=_fake())
    first = UserStore(store).load_state("alice").versions[0]
    mlflow.set_tracking_uri(uri)
    with PersonaService(store, lm=_fake(), tracking_uri=uri, register_prompts=True, persona_alias="champion") as service:
        loaded = service.program("alice")
        edited = mlflow.genai.register_prompt(prompt_name("alice"), "Answer as Alice would: tersely.")
        mlflow.genai.set_prompt_alias(prompt_name("alice"), "champion", edited.version)
        assert service.program("alice") is loaded  # the registry is read again only after the refresh time
        monkeypatch.setattr(service_module, "REGISTRY_REFRESH_S", 0.05)
        time.sleep(0.1)
        moved = service.program("alice")
        assert moved.instructions == "Answer as Alice would: tersely."
        time.sleep(0.1)
        assert service.program("alice") is moved  # read again, not moved: the loaded program is kept
        monkeypatch.setattr(service_module, "REGISTRY_REFRESH_S", 30)

        # The service moves the alias (as its rollbacks and alignments do) while a request reads it:
        # what that request read is not kept, so the next one reads the moved alias.
        read = service_module.registered_persona

        def read_while_the_alias_moves(*args):
            monkeypatch.setattr(service_module, "registered_persona", read)
            before = read(*args)
            newer = mlflow.genai.register_prompt(prompt_name("alice"), "Answer as Alice would: warmly.")
            mlflow.genai.set_prompt_alias(prompt_name("alice"), "champion", newer.version)
            service._forget_registered("alice")
            return before

        service._forget_registered("alice")
        monkeypatch.setattr(service_module, "registered_persona", read_while_the_alias_moves)
        assert service.program("alice").instructions == "Answer as Alice would: tersely."
        assert service.program("alice").instructions == "Answer as Alice would: warmly."
        service.rollback("alice", first.version)  # the service moves the alias: served at once
        assert service.program("alice").instructions == first.instructions["answer"]


def test_prompt_names_are_valid_and_distinct_for_ids_that_read_alike():
    names = {prompt_name(u) for u in ("Tsujii, Jun'ichi", "Tsujii  Jun ichi", "a/b", "a-b")}
    assert len(names) == 4 and all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)
