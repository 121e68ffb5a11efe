import json

import dspy
import pytest

from personaagent.data import SAMPLE_DIR
from personaagent.data.loaders import TaskData, UserData, load
from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.experiments.eval import (BASELINES, COMPILED, UNKNOWN_COST, Evaluation, bootstrap_interval,
                                           compare_to_reference, markdown_table, plot, summarize)
from personaagent.optimizers.pipeline import OPTIMIZERS, CompileConfig


def _user(user_id: str, labels: list[str], gold: str) -> UserData:
    # As in LaMP-1: a history item's own output is its reference list; its replay's output is a label.
    memories = [Interaction(f"paper {i}", "Some Cited Title; Another Title", float(i)) for i in range(len(labels))]
    replays = [Interaction(f"which paper would {user_id} cite? {i}", label, float(i)) for i, label in enumerate(labels)]
    question = dspy.Example(id=f"{user_id}-q", question="which paper?", answer=gold).with_inputs("question")
    return UserData(user_id, memories, replays, [question])


def test_the_baselines_are_the_methods_that_follow_no_persona_and_each_compiled_row_names_an_optimizer():
    assert BASELINES == ("none", "icl", "rag", "membank", "react")  # "none": no context, the paper's baseline name
    assert COMPILED["persona_noalign"] == "unaligned" and set(COMPILED.values()) <= set(OPTIMIZERS)


def test_majority_baselines_answer_with_labels_from_the_users_past_answers(tmp_path):
    task = LAMP_TASKS["LaMP-1"]
    data = TaskData(task, {"a": _user("a", ["[2]", "[2]", "[1]"], "[2]"), "b": _user("b", ["[1]"], "[2]")})
    evaluation = Evaluation(data, tmp_path, "local/none", CompileConfig(), questions_per_user=1)
    by_user = {r["user_id"]: r["answers"][0]["pred"] for r in evaluation.run_method("user_majority")}
    assert by_user == {"a": "[2]", "b": "[1]"}
    rows = evaluation.run_method("global_majority")
    assert {r["answers"][0]["pred"] for r in rows} == {"[2]"}
    assert summarize(task, "global_majority", rows)["accuracy"] == 1.0


def test_ratings_get_the_users_rounded_mean_and_the_global_most_frequent_rating(tmp_path):
    task = LAMP_TASKS["LaMP-3"]
    data = TaskData(task, {"a": _user("a", ["5", "5", "5", "1"], "5"), "b": _user("b", ["2", "3", "5"], "3")})
    evaluation = Evaluation(data, tmp_path, "local/none", CompileConfig(), questions_per_user=1)
    by_user = {r["user_id"]: r["answers"][0]["pred"] for r in evaluation.run_method("user_majority")}
    assert by_user == {"a": "4", "b": "3"}  # means 4.0 and 3.33
    assert {r["answers"][0]["pred"] for r in evaluation.run_method("global_majority")} == {"5"}  # mean 3.7 would say 4
    # More users, resumed in the same folder: the global answer is that of all users now chosen.
    data.users["c"], data.users["d"] = _user("c", ["2", "2", "2"], "2"), _user("d", ["2", "3"], "2")
    assert {r["answers"][0]["pred"] for r in evaluation.run_method("global_majority")} == {"2"}


def test_a_method_every_user_failed_is_reported_without_a_score(tmp_path):
    task = LAMP_TASKS["LaMP-3"]
    rows = [{"user_id": "a", "error": "RuntimeError: compile failed", "answers": []}]
    summary = summarize(task, "persona", rows)
    assert summary["mae"] is None and summary["n"] == 0 and summary["failed_users"] == ["a"]
    assert "| persona | - | - | - | - | 0 |" in markdown_table(task, [summary])
    answered = summarize(task, "none", [{"user_id": "a", "answers": [
        {"id": "q", "pred": "4", "gold": "5", "lm_calls": 1, "tokens": 10, "seconds": 1.0}]}])
    plot(task, [summary, answered], tmp_path, "results")  # a method without a score does not break the plot
    assert (tmp_path / "results.png").stat().st_size > 0


def _citing_user(user_id: str, gold: str) -> UserData:
    """A LaMP-1 author who wrote about parsing with kernels; the question's related candidate is at `gold`."""
    memories = [Interaction("title: Tree kernels for dependency parsing | abstract: We parse sentences with kernels.",
                            "Discriminative training of parsers; Kernel methods for syntax", 1.0)]
    related, unrelated = "Parsing sentences with syntax kernels", "Graph cuts for image segmentation"
    first, second = (related, unrelated) if gold == "[1]" else (unrelated, related)
    question = ('For an author who has written the paper with the title "Kernels for parsing", which reference is '
                f'related? Just answer with [1] or [2] without explanation. [1]: "{first}" [2]: "{second}"')
    return UserData(user_id, memories, [], [dspy.Example(id=f"{user_id}-q", question=question, answer=gold)])


def test_word_overlap_picks_the_candidate_whose_words_the_author_used_and_needs_candidates(tmp_path):
    data = TaskData(LAMP_TASKS["LaMP-1"], {"a": _citing_user("a", "[1]"), "b": _citing_user("b", "[2]")})
    rows = Evaluation(data, tmp_path, "local/none", CompileConfig(), questions_per_user=1).run_method("word_overlap")
    assert {r["user_id"]: r["answers"][0]["pred"] for r in rows} == {"a": "[1]", "b": "[2]"}  # wherever it is listed
    assert summarize(data.task, "word_overlap", rows)["accuracy"] == 1.0
    assert all(a["lm_calls"] == 0 for r in rows for a in r["answers"])
    # A rating has no candidates: the method does not apply, and leaves no results.
    ratings = TaskData(LAMP_TASKS["LaMP-3"], {"a": _user("a", ["5", "4"], "5")})
    assert Evaluation(ratings, tmp_path / "ratings", "local/none", CompileConfig(), 1).run_method("word_overlap") == []
    assert not (tmp_path / "ratings" / "raw" / "word_overlap").exists()


def test_summaries_count_generated_answers_and_keep_each_compiled_users_validation_scores():
    task = LAMP_TASKS["LaMP-3"]
    answer = {"id": "q", "pred": "4", "gold": "5", "lm_calls": 1, "tokens": 10, "seconds": 1.0}
    rows = [{"user_id": "a", "answers": [{**answer, "scoring": "likelihood"}],
             "compile": {"status": "compiled", "lm_calls": 10, "tokens": 100, "seconds": 5.0, "scores": [0.5, 0.75]}},
            {"user_id": "b", "answers": [{**answer, "scoring": "generation"}],
             "compile": {"status": "skipped", "lm_calls": 0, "tokens": 0, "seconds": 0.0, "scores": [0.5]}}]
    summary = summarize(task, "persona", rows)
    assert summary["generated_answers"] == 1 and summary["validation_scores"] == [[0.5, 0.75]]
    assert summary["compile_lm_calls_per_user"] == 10 and "replay_scores" not in summary


def test_the_offline_cost_is_a_fresh_runs_compile_and_profile_and_an_ablation_has_its_own_none():
    task = LAMP_TASKS["LaMP-3"]
    answer = {"id": "q", "pred": "4", "gold": "5", "lm_calls": 1, "tokens": 10, "seconds": 1.0}
    profile = {"lm_calls": 1, "tokens": 50, "seconds": 8.0}
    compiled = {"status": "compiled", "lm_calls": 6, "tokens": 100, "seconds": 20.0, "scores": [0.5]}
    persona = summarize(task, "persona", [{"user_id": "a", "answers": [answer], "compile": compiled, "profile": profile}])
    assert (persona["offline_lm_calls_per_user"], persona["offline_seconds_per_user"]) == (7, 28.0)
    membank = summarize(task, "membank", [{"user_id": "a", "answers": [answer], "compile": None, "profile": profile}])
    assert (membank["offline_lm_calls_per_user"], membank["offline_seconds_per_user"]) == (1, 8.0)
    ablation = summarize(task, "persona_nopersona", [{"user_id": "a", "answers": [answer], "profile": profile,
                                                      "compile": {**compiled, "status": "skipped"}}])
    rag = summarize(task, "rag", [{"user_id": "a", "answers": [answer], "compile": None, "profile": None}])
    # A profile written before its cost was kept: the compile alone would read as the whole cost.
    unknown = summarize(task, "persona", [{"user_id": "a", "answers": [answer], "compile": compiled,
                                           "profile": UNKNOWN_COST}])
    assert not {"offline_lm_calls_per_user"} & (set(ablation) | set(rag) | set(unknown))


def test_a_headline_eval_writes_a_profile_for_membank_only_and_counts_it_there(tmp_path, headline_data):
    from personaagent.program.lm import FAKE_LM
    from personaagent.program.store import UserStore

    evaluation = Evaluation(headline_data, tmp_path / "out", FAKE_LM, CompileConfig(lm=FAKE_LM), None)
    persona = evaluation.run_method("persona")
    assert persona[0]["compile"]["status"] == "compiled" and persona[0]["profile"] is None
    assert not (UserStore(tmp_path / "out" / "stores" / "base").user_dir("hana") / "profile.json").exists()
    membank = evaluation.run_method("membank")
    assert membank[0]["profile"]["lm_calls"] == 1
    resumed = Evaluation(headline_data, tmp_path / "out", FAKE_LM, CompileConfig(lm=FAKE_LM), None)
    assert resumed.run_method("membank")[0]["profile"] == membank[0]["profile"]  # read back, not written again


def test_the_compiled_row_counts_its_compile_whichever_row_or_run_compiled_first(tmp_path):
    from personaagent.program.lm import FAKE_LM

    data = load(SAMPLE_DIR / "LaMP-3-amazon").select(1)
    out = tmp_path / "out"
    ablation = Evaluation(data, out, FAKE_LM, CompileConfig(lm=FAKE_LM), 1).run_method("persona_nopersona")
    assert ablation[0]["compile"]["status"] == "skipped" and ablation[0]["compile"]["lm_calls"] == 0
    # The aligned row, run after its ablation compiled the user, and again after an interrupted run:
    # both times the compile is skipped, and both times a fresh run's cost is the row's.
    persona = Evaluation(data, out, FAKE_LM, CompileConfig(lm=FAKE_LM), 1).run_method("persona")
    (out / "raw" / "persona" / f"{persona[0]['user_id']}.json").unlink()
    resumed = Evaluation(data, out, FAKE_LM, CompileConfig(lm=FAKE_LM), 1).run_method("persona")
    for rows in (persona, resumed):
        assert rows[0]["compile"]["status"] == "compiled" and rows[0]["compile"]["lm_calls"] > 0
        assert summarize(data.task, "persona", rows)["compile_lm_calls_per_user"] == rows[0]["compile"]["lm_calls"]
    assert resumed[0]["compile"]["seconds"] == persona[0]["compile"]["seconds"]


def _rows(correct: list[bool], label: str = "[1]") -> list[dict]:
    other = "[2]" if label == "[1]" else "[1]"
    return [{"user_id": f"u{i}", "answers": [{"id": f"q{i}", "pred": label if ok else other, "gold": label,
                                              "lm_calls": 1, "tokens": 1, "seconds": 0.1}]}
            for i, ok in enumerate(correct)]


def test_intervals_cover_the_score_and_narrow_with_more_users():
    task = LAMP_TASKS["LaMP-1"]
    few, many = _rows([True, False] * 5), _rows([True, False] * 50)
    low, high = bootstrap_interval(task, few)
    assert low < 0.5 < high and bootstrap_interval(task, few) == [low, high]  # seeded: reproducible
    low_many, high_many = bootstrap_interval(task, many)
    assert high_many - low_many < high - low


def test_each_method_gets_its_paired_difference_to_persona():
    task = LAMP_TASKS["LaMP-1"]
    rows = {"persona": _rows([False] * 6 + [True] * 4), "rag": _rows([True] * 10), "none": _rows([False] * 6 + [True] * 4)}
    summaries = [summarize(task, method, r) for method, r in rows.items()]
    compare_to_reference(task, summaries, rows)
    by_method = {s["method"]: s for s in summaries}
    assert "minus_persona" not in by_method["persona"]
    assert by_method["rag"]["minus_persona"]["diff"] == 0.6
    assert by_method["rag"]["minus_persona"]["ci95"][0] > 0  # right wherever persona was wrong
    assert by_method["none"]["minus_persona"] == {"diff": 0.0, "ci95": [0.0, 0.0]}  # the same answers
    assert "| rag | 1.000 | 1.000 | [1.000, 1.000] | +0.600 [" in markdown_table(task, summaries)


def test_the_difference_to_persona_is_taken_on_the_questions_both_answered():
    task = LAMP_TASKS["LaMP-1"]
    persona = _rows([True] * 4 + [False] * 6)
    persona[0] = {"user_id": "u0", "error": "RuntimeError: compile failed", "answers": []}  # its one right answer lost
    rows = {"persona": persona, "rag": _rows([True] * 4 + [False] * 6)}
    summaries = [summarize(task, method, r) for method, r in rows.items()]
    compare_to_reference(task, summaries, rows)
    assert summaries[1]["minus_persona"] == {"diff": 0.0, "ci95": [0.0, 0.0]}  # same answers where both answered


def test_the_retrieval_benchmark_scores_each_search_on_the_users_own_history(tmp_path):
    from personaagent.data import SAMPLE_DIR
    from personaagent.experiments import bench_retrieval

    assert bench_retrieval.main(["--data", str(SAMPLE_DIR / "LaMP-2N-huffpost"), "--users", "1", "--items", "6",
                                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "LaMP-2N-huffpost.json").read_text())
    guesses = {row["guess"]: row["accuracy"] for row in result["rows"]}
    assert result["interactions"] == 6 and len(guesses) == 7 and "subject / hybrid" in guesses
    assert all(0.0 <= accuracy <= 1.0 for accuracy in guesses.values())
    assert (tmp_path / "LaMP-2N-huffpost.png").stat().st_size > 0


def test_intervals_resample_users_not_questions():
    """Two users, ten questions each, one always right and one always wrong: resampling questions
    would give a narrow interval around 0.5; resampling users can draw either user twice."""
    task = LAMP_TASKS["LaMP-1"]
    rows = [{"user_id": user, "answers": [{"id": f"{user}{i}", "pred": "[1]" if right else "[2]", "gold": "[1]",
                                           "lm_calls": 1, "tokens": 1, "seconds": 0.1} for i in range(10)]}
            for user, right in (("a", True), ("b", False))]
    assert bootstrap_interval(task, rows) == [0.0, 1.0]


def test_questions_per_user_all_answers_every_question(tmp_path):
    from personaagent.experiments.eval import _questions_per_user

    data = load(SAMPLE_DIR / "LaMP-2N-huffpost").select(1)
    user = next(iter(data.users.values()))
    assert len(user.questions) > 1
    assert Evaluation(data, tmp_path, "local/none", CompileConfig(), None).questions(user) == user.questions
    assert Evaluation(data, tmp_path, "local/none", CompileConfig(), 1).questions(user) == user.questions[-1:]
    assert _questions_per_user("all") is None and _questions_per_user("2") == 2
    with pytest.raises(Exception, match="positive number or 'all'"):
        _questions_per_user("0")


def test_eval_takes_the_compiles_engine_options_from_the_same_helper():
    from personaagent.app.cli import build_parser, engine_from
    from personaagent.optimizers.engines import LocalEngine, RayEngine

    def parsed(command: str, *options: str):
        where = ["--out", "o"] if command == "eval" else ["--store", "s"]
        return build_parser([command]).parse_args([command, "--data", "d", *where, *options])

    for command in ("eval", "compile"):
        assert engine_from(parsed(command, "--engine", "ray", "--workers", "3", "--address", "auto")) == RayEngine("auto", 3)
        assert engine_from(parsed(command, "--workers", "2")) == LocalEngine(2)
        assert engine_from(parsed(command)) is None  # one local worker: this process, with the caller's LM


def test_a_compiled_method_is_prepared_by_the_pipeline_and_answers_the_same_on_a_local_engine(tmp_path, monkeypatch):
    from personaagent.optimizers import pipeline
    from personaagent.optimizers.engines import LocalEngine
    from personaagent.program.lm import FAKE_LM
    from personaagent.program.store import UserStore

    prepared = []
    for stage in ("ingest", "write_profile"):  # the shared store is made by the compile's own stages
        monkeypatch.setattr(pipeline, stage, lambda store, *args, _run=getattr(pipeline, stage), _name=stage:
                            prepared.append((_name, store.root.name)) or _run(store, *args))
    data = load(SAMPLE_DIR / "LaMP-3-amazon").select(2)
    answers = {}
    for name, engine in (("in-process", None), ("local", LocalEngine(1))):
        out = tmp_path / name
        evaluation = Evaluation(data, out, FAKE_LM, CompileConfig(lm=FAKE_LM), 1,
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", engine=engine)
        rows = evaluation.run_method("persona")
        assert all(not r.get("error") and r["compile"]["status"] == "compiled" for r in rows), rows
        answers[name] = [(r["user_id"], a["id"], a["pred"]) for r in rows for a in r["answers"]]
        # A fresh compile writes the profile the eval shares: its cost is the row's too.
        assert all(r["profile"]["lm_calls"] == 1 for r in rows)
        summary = summarize(data.task, "persona", rows)
        assert summary["offline_lm_calls_per_user"] == summary["compile_lm_calls_per_user"] + 1
        for user_id in data.users:  # each compiled store starts from the shared profile, through the store
            assert UserStore(out / "stores" / "persona").profile(user_id) == UserStore(out / "stores" / "base").profile(user_id)
    assert answers["in-process"] == answers["local"] and len(answers["local"]) == 2
    assert prepared.count(("ingest", "base")) == prepared.count(("write_profile", "base")) == 2 * len(data.users)
