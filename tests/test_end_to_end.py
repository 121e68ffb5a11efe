"""The whole path on the real embedded model (SmolLM2-135M through llama.cpp), real MLflow and a
real subprocess CLI: prepare, predict, compile (interrupted and resumed), ask."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import Literal

import dspy
import pytest

from personaagent.data import SAMPLE_DIR
from personaagent.data.tasks import LAMP_TASKS
from personaagent.program import models
from personaagent.program.agent import answer_module
from personaagent.program.lm import LlamaCppEngine, make_lm, use_lm
from personaagent.program.persona import BASE_INSTRUCTION
from personaagent.program.store import UserStore

pytestmark = pytest.mark.model
SMALL = "smollm2-135m"
CLI = [sys.executable, "-m", "personaagent.app.cli"]


@pytest.fixture(scope="module")
def small_model():
    return models.prepare(SMALL, progress=False)  # idempotent and cached


def _env(tmp_path, **extra):
    return {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "dspy_cache"), **extra}


def test_prepare_detects_and_rebuilds_a_corrupted_or_partial_file(tmp_path, monkeypatch, small_model):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    path = models.prepare(SMALL, progress=False)
    assert path.parent == tmp_path / "models" and models.is_ready(SMALL)
    with open(path, "r+b") as f:  # flip one byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not models.is_ready(SMALL)
    assert models.sha256_of(models.prepare(SMALL, progress=False)) == models.get_model(SMALL).sha256
    with open(path, "r+b") as f:  # a partial file
        f.truncate(1000)
    models.prepare(SMALL, progress=False)
    assert models.is_ready(SMALL)


def test_unknown_lm_names_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="local/qwen2.5-coder-1.5b.*local/smollm2-135m"):
        make_lm("local/gpt-9")
    out = subprocess.run(CLI + ["ask", "--store", str(tmp_path), "--user", "u", "--lm", "local/gpt-9", "hi"],
                         capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 2 and "no compiled program for user 'u'" in out.stderr
    out = subprocess.run(CLI + ["compile", "--data", str(SAMPLE_DIR / "LaMP-3-amazon"), "--store", str(tmp_path),
                                "--lm", "local/gpt-9"], capture_output=True, text=True, env=_env(tmp_path))
    assert out.returncode == 2 and "local/qwen2.5-coder-1.5b" in out.stderr


def test_real_prediction_parses_into_the_declared_literal(small_model):
    class Rate(dspy.Signature):
        """Rate the review from 1 to 5."""

        review: str = dspy.InputField()
        rating: Literal["1", "2", "3", "4", "5"] = dspy.OutputField()

    lm = make_lm(f"local/{SMALL}", cache=False)
    with use_lm(lm):
        for review in ["Terrible, broke on day one.", "Perfect strings, great tone!"]:
            assert dspy.Predict(Rate)(review=review).rating in {"1", "2", "3", "4", "5"}
    assert lm.history[-1]["usage"]["completion_tokens"] > 0


def test_reusing_saved_prompt_states_changes_no_answer_and_keeps_them_within_their_bytes(small_model):
    """Calls alternate between two signatures, as plan and answer do: answers resumed from a saved
    prefix state must equal answers computed from scratch, and the saved states stay within their bytes."""

    class Rate(dspy.Signature):
        """Rate the review from 1 to 5."""

        review: str = dspy.InputField()
        rating: Literal["1", "2", "3", "4", "5"] = dspy.OutputField()

    class Topic(dspy.Signature):
        """Name the product the review is about, in a few words."""

        review: str = dspy.InputField()
        product: str = dspy.OutputField()

    reviews = ["Terrible, broke on day one.", "Perfect strings, great tone!", "Fine strap, a bit short."]

    def answers(engine):
        lm = dspy.LM(f"local/{SMALL}", engine=engine, cache=False, temperature=0.0, max_tokens=40)
        with use_lm(lm):
            return [(dspy.Predict(Rate)(review=r).rating, dspy.Predict(Topic)(review=r).product) for r in reviews]

    # 16 MB hold three of the six prompts' states (about 5 MB each: KV cells only, no logits).
    cached, fresh = LlamaCppEngine(SMALL, prefix_cache_mb=16), LlamaCppEngine(SMALL, prefix_cache_mb=0)
    try:
        assert answers(cached) == answers(fresh)
        kept = cached._llama.cache
        assert 0 < len(kept.cache_state) < 2 * len(reviews) and kept.cache_size <= 16 * 2**20
        assert fresh._llama.cache is None
    finally:
        cached.close()
        fresh.close()


CITATION = ('For an author who has written the paper with the title "{title}", which reference is related? '
            'Just answer with [1] or [2] without explanation. [1]: "{a}" [2]: "{b}"')
PAIRS = [("Dependency parsing with neural networks", "Fast shift-reduce parsing", "Growing tomatoes indoors"),
         ("Statistical machine translation of idioms", "A survey of wine making", "Phrase-based translation models"),
         ("Word sense disambiguation in context", "Senses of words in corpora", "The history of the bicycle")]


def test_label_scoring_on_the_real_engine_is_a_distribution_and_a_shared_prefix_changes_nothing(small_model):
    lm = make_lm(f"local/{SMALL}", cache=False)
    module = answer_module(LAMP_TASKS["LaMP-3"], BASE_INSTRUCTION)
    review = "What is the score of the following review on a scale of 1 to 5? review: Broke on day one, awful."
    with use_lm(lm):
        first = module(question=review, context="(nothing)")
        module(question="What is the score of the following review? review: Lovely tone.", context="(nothing)")
        again = module(question=review, context="(nothing)")
    assert first.scoring == "likelihood" and set(first.label_scores) == {"1", "2", "3", "4", "5"}
    assert abs(sum(first.label_scores.values()) - 1) < 1e-6 and all(0 < p < 1 for p in first.label_scores.values())
    assert first.answer == LAMP_TASKS["LaMP-3"].decide(first.label_scores)
    # Resumed from the prefix the previous call left: the same distribution.
    assert again.label_scores == first.label_scores


def test_a_prompt_is_scored_in_the_same_batches_and_to_the_same_scores_whatever_was_asked_before(small_model):
    # llama.cpp's numbers for a token depend on the batch it is evaluated in (on the 1.5B model a
    # prompt resumed from another's prefix scored up to 0.12 apart in log-probability): a prompt must be
    # evaluated in the same batches whether it is resumed or not.
    system = "You answer as one user would. Their persona and the fields follow. " * 4
    rate = "What is the score of the following review on a scale of 1 to 5? review: "
    asked = [{"role": "system", "content": system}, {"role": "user", "content": rate + "Late, but works fine."}]
    same_persona = [asked[0], {"role": "user", "content": rate + "Lovely tone."}]
    other_persona = [{"role": "system", "content": "Another user's persona."}, asked[1]]
    labels = [f'{{\n  "answer": "{rating}"\n}}' for rating in "12345"]
    engine = LlamaCppEngine(SMALL)
    engine._prefixes.capacity = 0  # scoring resumes from the context only (kept prefixes: test_prefix_states)
    batches, evaluate = [], engine._llama.eval
    engine._llama.eval = lambda tokens: (batches.append((engine._llama.n_tokens, len(tokens))), evaluate(tokens))[1]
    lm = dspy.LM(f"local/{SMALL}", engine=engine, cache=False, max_tokens=8)
    try:
        fresh, _ = engine.score(asked, labels)
        fresh_batches = set(batches)
        # The last: a generation, then another prompt, then the generation again, restored from the
        # generation cache (a state llama.cpp batched its own way).
        for before in ([same_persona], [asked], [other_persona], [same_persona, "generate", other_persona, "generate"]):
            for messages in before:
                engine.score(messages, labels) if messages != "generate" else lm(messages=same_persona)
            batches.clear()
            scores, evaluated = engine.score(asked, labels)
            assert scores == fresh and set(batches) <= fresh_batches, before
            resumed = before in ([same_persona], [asked])  # from the shared system message, or all but the end
            assert (evaluated < sum(size for _, size in fresh_batches)) == resumed, before
    finally:
        engine.close()


def test_a_choice_between_candidates_does_not_depend_on_their_order_on_the_real_model(small_model):
    module = answer_module(LAMP_TASKS["LaMP-1"], BASE_INSTRUCTION)
    with use_lm(make_lm(f"local/{SMALL}", cache=False)):
        for title, a, b in PAIRS:
            listed = module(question=CITATION.format(title=title, a=a, b=b), context="(nothing)")
            swapped = module(question=CITATION.format(title=title, a=b, b=a), context="(nothing)")
            # The same paper gets the same probability wherever it is listed, so the same paper is
            # chosen unless the model cannot tell them apart.
            assert swapped.label_scores["[2]"] == pytest.approx(listed.label_scores["[1]"], abs=1e-9)
            if abs(listed.label_scores["[1]"] - 0.5) > 0.02:
                assert {"[1]": b, "[2]": a}[swapped.answer] == {"[1]": a, "[2]": b}[listed.answer]


def _compile(tmp_path, store, log):
    # Output goes to a file: an unread pipe fills up and blocks the child.
    return subprocess.Popen(
        CLI + ["compile", "--data", str(SAMPLE_DIR / "LaMP-3-amazon"), "--store", str(store), "--users", "2", "--n-recent", "1",
               "--lm", f"local/{SMALL}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)


def test_compile_interrupted_resumes_and_is_tracked_then_ask_answers(tmp_path, small_model):
    store = tmp_path / "store"
    proc = _compile(tmp_path, store, tmp_path / "first.log")
    deadline = time.time() + 1200
    while not list(store.glob("users/*/program.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # interrupt after the first user is saved
    proc.wait()
    done_first = UserStore(store, embedder=object()).users()
    assert len(done_first) >= 1

    proc = _compile(tmp_path, store, tmp_path / "second.log")
    proc.wait(timeout=900)
    output = (tmp_path / "second.log").read_text()
    assert proc.returncode == 0, output
    for user in done_first:
        assert any(line.startswith("skipped") and user in line for line in output.splitlines()), output
    users = UserStore(store, embedder=object()).users()
    assert len(users) == 2

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["personaagent-compile"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and parents[0].data.params["optimizer"] == "persona"
    # Users aligned by either compile (the first may have saved both before it was killed).
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    compiled = [r for r in children if r.data.tags.get("status") == "compiled"]
    assert compiled and {r.data.tags["user_id"] for r in compiled} <= set(users)
    client = mlflow.MlflowClient()
    run = compiled[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "personas")]
    assert "seconds_adaptation" in run.data.metrics  # where the alignment's time went
    # What each user's compile spent is recorded: 0 LM calls where the killed compile had already
    # answered the user's history (its first pass runs every user up to `history` before any is
    # saved) and no rewrite was tried, so no count above 0 can be required.
    assert all(r.data.metrics["lm_calls"] >= 0 and "tokens" in r.data.metrics for r in compiled)

    state = UserStore(store, embedder=object()).load_state(users[0])
    assert state.versions and state.current.instructions["answer"]
    out = subprocess.run(CLI + ["ask", "--store", str(store), "--user", users[0], "--verbose",
                                "What is the score of the following review on a scale of 1 to 5? review: Great strings."],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in {"1", "2", "3", "4", "5"}
    assert "persona v" in out.stdout


def test_eval_compares_methods_on_the_same_users_and_resumes(tmp_path, small_model):
    out = tmp_path / "eval"
    common = CLI + ["eval", "--data", str(SAMPLE_DIR / "LaMP-3-amazon"), "--lm", f"local/{SMALL}", "--out", str(out),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    first = subprocess.run(common + ["--users", "1", "--methods", "global_majority,user_majority,none,persona"],
                           capture_output=True, text=True, env=_env(tmp_path), timeout=1200)
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    by_method = {s["method"]: s for s in results["methods"]}
    assert results["users"] == 1 and set(by_method) == {"global_majority", "user_majority", "none", "persona"}
    assert all(s["n"] == 1 and s["failed_users"] == [] and 0 <= s["mae"] <= 4 for s in by_method.values())
    assert by_method["user_majority"]["lm_calls_per_question"] == 0 and by_method["none"]["lm_calls_per_question"] >= 1
    assert by_method["persona"]["compile_lm_calls_per_user"] > 0
    assert (out / "results.png").stat().st_size > 0 and "| persona |" in (out / "results.md").read_text()

    # A second run over more users answers only what is new, and keeps its own summary beside the first.
    def answered():  # the LM methods' stored answers (the free baselines are always recomputed)
        return {p: p.stat().st_mtime_ns for m in ("none", "persona") for p in (out / "raw" / m).glob("*.json")}

    before = answered()
    second = subprocess.run(common + ["--users", "2", "--methods", "user_majority,none", "--name", "two-users"],
                            capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert second.returncode == 0, second.stderr
    after = answered()
    assert {p: t for p, t in after.items() if p in before} == before and len(after) == len(before) + 1
    assert [s["n"] for s in json.loads((out / "two-users.json").read_text())["methods"]] == [2, 2]
    assert json.loads((out / "results.json").read_text()) == results

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["personaagent-eval"], output_format="list")
    assert sorted(r.data.tags["method"] for r in runs) == sorted(["global_majority", "user_majority", "none", "persona",
                                                                  "user_majority", "none"])


def test_a_chat_turn_on_the_real_model_through_the_openai_client(tmp_path, small_model):
    import openai

    from personaagent.app.http import create_app, running
    from personaagent.app.service import PersonaService

    with PersonaService(tmp_path / "store", make_lm(f"local/{SMALL}", max_tokens=24)) as service, \
            running(create_app(service, "t")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="t", max_retries=0)
        reply = client.chat.completions.create(model="persona", user="ada", messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content.strip()
        remembered = service.store.memory("ada").all()
        assert [r.input for r in remembered] == ["Say hello."] and remembered[0].metadata["reply"] == reply.choices[0].message.content
