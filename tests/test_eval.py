import dspy

from personaagent.data.loaders import TaskData, UserData
from personaagent.data.tasks import LAMP_TASKS, Interaction
from personaagent.experiments.eval import Evaluation, markdown_table, plot, summarize
from personaagent.optimizers.compile import CompileConfig


def _user(user_id: str, labels: list[str], gold: str) -> UserData:
    # As in LaMP-1: a history item's own output is its reference list; its replay's output is a label.
    memories = [Interaction(f"paper {i}", "Some Cited Title; Another Title", float(i)) for i in range(len(labels))]
    replays = [Interaction(f"which paper would {user_id} cite? {i}", label, float(i)) for i, label in enumerate(labels)]
    question = dspy.Example(id=f"{user_id}-q", question="which paper?", answer=gold).with_inputs("question")
    return UserData(user_id, memories, replays, [question])


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
    assert "| persona | - | - | 0 |" in markdown_table(task, [summary])
    answered = summarize(task, "none", [{"user_id": "a", "answers": [
        {"pred": "4", "gold": "5", "lm_calls": 1, "tokens": 10, "seconds": 1.0}]}])
    plot(task, [summary, answered], tmp_path, "results")  # a method without a score does not break the plot
    assert (tmp_path / "results.png").stat().st_size > 0
