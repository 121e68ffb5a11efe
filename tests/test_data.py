import json
from pathlib import Path

import pytest

from personaagent.data import SAMPLE_DIR
from personaagent.data.loaders import DataError, UserData, load, load_jsonl, load_lamp, memory_replays
from personaagent.data.tasks import (CANDIDATES, LAMP_TASKS, Interaction, resolve_task, rouge_1, rouge_l,
                                     task_from_dict, task_to_dict)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside this checkout")


@needs_shared
@pytest.mark.parametrize("folder,task,kind", [
    ("LaMP-1-acl", "LaMP-1", "classification"),
    ("LaMP-2N-huffpost", "LaMP-2N", "classification"),
    ("LaMP-3-amazon", "LaMP-3", "rating"),
])
def test_lamp_format_sets_load_per_user(folder, task, kind):
    data = load(SHARED / folder)
    assert data.task.name == task and data.task.kind == kind
    questions = json.loads((SHARED / folder / "questions.json").read_text())
    assert len(data.users) == len({q["user_id"] for q in questions})
    assert sum(len(u.questions) for u in data.users.values()) == len(questions)
    for user in list(data.users.values())[:20]:
        assert user.memories and all(q.answer is not None for q in user.questions)
        # A question's own text never sits in the memory used to answer it.
        memory_inputs = {m.input for m in user.memories}
        assert not any(q.question in memory_inputs for q in user.questions)
        # Replays are time-ordered past items with the user's real answer, each naming its memory record.
        times = [r.timestamp or 0 for r in user.replays]
        keys = {m.key for m in user.memories}
        assert times == sorted(times) and all(r.output and r.metadata["memory_key"] in keys for r in user.replays)
        if data.task.labels:
            assert all(r.output in data.task.labels for r in user.replays)
    assert data.dataset.num_rows == len(data.users)


@needs_shared
def test_labels_come_from_the_questions_when_listed():
    data = load(SHARED / "LaMP-2N-huffpost")
    assert len(data.task.labels) == 29 and "u.s. news" in data.task.labels


def _official(tmp_path, name="LaMP_3"):
    questions = [
        {"id": "100", "input": "What is the score of this review? review: great", "profile": [
            {"id": "p1", "text": "Loved it", "score": "5"}, {"id": "p2", "text": "Meh", "score": "3"}]},
        {"id": "101", "input": "What is the score of this review? review: bad", "profile": [
            {"id": "p3", "text": "Awful", "score": "1"}]},
    ]
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": name, "golds": [
        {"id": "100", "output": "5"}, {"id": "101", "output": "1"}]}))
    return tmp_path


def test_official_lamp_files_read_unchanged(tmp_path):
    data = load_lamp(_official(tmp_path))
    assert data.task.name == "LaMP-3"
    # Official LaMP has one profile per question: each question is its own user.
    assert set(data.users) == {"100", "101"}
    assert [r.output for r in data.users["100"].replays] == ["5", "3"]
    assert data.users["101"].questions[0].answer == "1"
    # Each replay names its own record in memory: replayed as of it, memory hides that record.
    user = data.users["100"]
    assert [r.metadata["memory_key"] for r in user.replays] == [m.key for m in user.memories]


@pytest.mark.parametrize("folder", ["LaMP-2N-huffpost", "LaMP-3-amazon"])
def test_the_users_dataset_gives_each_user_back_unchanged(folder):
    # What compile, its engines and eval consume: one row per user.
    data = load(SAMPLE_DIR / folder)
    rows = list(data.dataset)
    assert data.dataset.column_names == ["user_id", "memories", "replays", "questions"]
    assert [UserData.from_row(row) for row in rows] == list(data.users.values())


def test_replays_carry_their_memory_records_key_and_time():
    for user in load(SAMPLE_DIR / "LaMP-3-amazon").users.values():
        records = {m.key: m for m in user.memories}
        assert user.replays and all(r.timestamp is not None and records[r.metadata["memory_key"]].timestamp == r.timestamp
                                    for r in user.replays)


def test_a_memory_record_replays_as_the_task_phrases_its_item_or_as_it_was_added():
    # A store's records are what a loader made from items, or what the service added as it was.
    task = LAMP_TASKS["LaMP-3"]
    item = {"id": "p1", "summary": "Sings", "text": "Bright | clear strings", "score": 5, "time": 3}
    made = task.to_memory(item)
    added = Interaction("What is the score of this review? review: dull strings", "2", 4.0)
    assert task.from_memory(made) == {"summary": "Sings", "text": "Bright | clear strings", "score": "5", "time": 3.0,
                                      "id": "p1"}
    assert task.from_memory(added) is None
    replays = memory_replays(task, [made, added])
    assert [(r.input, r.output) for r in replays] == [(task.to_interaction(item, []).input, "5"), (added.input, "2")]
    assert [r.metadata["memory_key"] for r in replays] == [made.key, added.key]


def test_a_citation_replays_other_candidate_was_not_yet_cited_by_the_author():
    # Its real question's other candidate is a paper the author has not cited; a replay's must look
    # the same as of its time, or the author's history would point to the wrong candidate.
    papers = [{"id": "p1", "title": "Parsing German", "year": 2001, "references": ["Old parser", "Tree banks"]},
              {"id": "p2", "title": "Parsing Czech", "year": 2003, "references": ["Old parser", "Czech morphology"]},
              {"id": "p3", "title": "Parsing with neural nets", "year": 2005, "references": ["Neural nets", "Old parser"]}]
    task = resolve_task("LaMP-1")
    replay = task.to_interaction(papers[1], [papers[0], papers[2]])
    candidates = {f"[{number}]": title for number, title in CANDIDATES.findall(replay.input)}
    other = candidates["[2]" if replay.output == "[1]" else "[1]"]
    assert other == "Neural nets"  # cited later, never before 2003
    assert task.to_interaction(papers[2], papers[:2]) is None  # everything else it could offer was cited before


def test_a_citation_replays_other_candidate_is_the_later_reference_least_like_the_paper():
    # The real question's other candidate is an unrelated paper: of the titles the author cites
    # only later, the replay offers the one sharing the fewest words with the paper's title.
    later = {"id": "p9", "title": "Dependency parsing revisited", "year": 2010,
             "references": ["Dependency parsing with graphs", "Parsing morphology jointly", "Czech dependency treebank",
                            "Morphology for Czech parsing", "Speech recognition lattices", "Dependency parsing in Czech"]}
    paper = {"id": "p5", "title": "Dependency parsing for Czech morphology", "year": 2003, "references": ["Old parser"]}
    replay = resolve_task("LaMP-1").to_interaction(paper, [later])
    candidates = {f"[{number}]": title for number, title in CANDIDATES.findall(replay.input)}
    assert candidates["[2]" if replay.output == "[1]" else "[1]"] == "Speech recognition lattices"


def test_malformed_lamp_names_file_record_and_field(tmp_path):
    _official(tmp_path)
    questions = json.loads((tmp_path / "dev_questions.json").read_text())
    del questions[1]["profile"]
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    with pytest.raises(DataError, match=r"dev_questions\.json: record 1 \(id 101\): missing field 'profile'"):
        load_lamp(tmp_path)
    (tmp_path / "dev_questions.json").write_text("[{")
    with pytest.raises(DataError, match=r"dev_questions\.json.*not valid JSON"):
        load_lamp(tmp_path)
    questions[1]["profile"] = ["a string, not an item"]
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    with pytest.raises(DataError, match=r"record 1 \(id 101\): profile\[0\] must be an object, not str"):
        load_lamp(tmp_path)


def test_a_questions_file_without_its_outputs_file_says_so(tmp_path):
    _official(tmp_path)
    (tmp_path / "dev_outputs.json").unlink()
    with pytest.raises(ValueError, match=r"no outputs file beside it \(dev_outputs\.json\)"):
        load_lamp(tmp_path)


def test_jsonl_interactions(tmp_path):
    path = tmp_path / "logs.jsonl"
    rows = [{"user_id": "u1", "timestamp": t, "input": f"q{t}", "output": "yes" if t % 2 else "no"} for t in range(5)]
    rows.append({"user_id": "u2", "timestamp": 1, "input": "hello", "output": "no", "metadata": {"src": "web"}})
    rows.append({"user_id": "u2", "timestamp": 2, "input": "again", "output": "yes"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_jsonl(path, kind="classification")
    assert data.task.labels == ("no", "yes")
    u1 = data.users["u1"]
    assert [m.input for m in u1.memories] == ["input: q0", "input: q1", "input: q2", "input: q3"]
    assert [q.question for q in u1.questions] == ["q4"] and u1.questions[0].answer == "no"
    assert [r.input for r in u1.recent(2)] == ["q2", "q3"]


def test_a_parquet_file_or_a_saved_dataset_loads_like_the_jsonl_log(tmp_path):
    import datasets

    rows = [{"user_id": "u1", "timestamp": float(t), "input": f"q{t}", "output": "yes" if t % 2 else "no"} for t in range(5)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "log.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    expected = load(tmp_path / "log.jsonl", "classification")
    for path in (tmp_path / "log.parquet", tmp_path / "saved"):
        data = load(path, "classification")
        assert data.task.labels == expected.task.labels == ("no", "yes")
        assert [m.input for m in data.users["u1"].memories] == [m.input for m in expected.users["u1"].memories]
        assert [q.question for q in data.users["u1"].questions] == ["q4"]
    datasets.Dataset.from_list([{"user_id": "u", "input": ""}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet: record row 0: missing field 'input'"):
        load(tmp_path / "bad.parquet")


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"user_id": "u", "input": "x"}) + "\n" + json.dumps({"user_id": "u"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: record line 2: missing field 'input'"):
        load_jsonl(path)
    path.write_text(json.dumps({"user_id": "u", "input": "x", "timestamp": "yesterday"}))
    with pytest.raises(DataError, match="timestamp"):
        load_jsonl(path)
    path.write_bytes(json.dumps({"user_id": "u", "input": "x"}).encode() + b"\n" + b'{"user_id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: record line 2: not UTF-8"):
        load_jsonl(path)
    path.write_text(json.dumps({"user_id": "u", "input": "x"}))
    with pytest.raises(ValueError, match="kind, one of classification, rating, generation; not 'banana'"):
        load(path, "banana")


def test_task_names_and_round_trip():
    assert resolve_task("LaMP_2").name == "LaMP-2N"
    assert resolve_task("LaMP-2M").name == "LaMP-2M"
    assert resolve_task("lamp3").name == "LaMP-3"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_task("LaMP-9")
    spec = LAMP_TASKS["LaMP-2N"].with_labels(("a", "b"))
    assert task_from_dict(task_to_dict(spec)).labels == ("a", "b")


def test_metrics():
    rating = LAMP_TASKS["LaMP-3"]
    m = rating.metrics(["5", "3", "x"], ["4", "3", "1"])
    assert m["mae"] == pytest.approx((1 + 0 + 4) / 3) and m["rmse"] == pytest.approx((17 / 3) ** 0.5)
    assert rating.score("4", "5") == pytest.approx(0.75)
    cls = LAMP_TASKS["LaMP-2N"]
    m = cls.metrics(["politics", "sports", "politics"], ["politics", "politics", "politics"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    assert rouge_1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert "mean 4.00" in rating.output_stats(["5", "3"])


def test_label_habits_count_only_the_tasks_labels():
    # A LaMP-1 history item's output is its reference list: no label habit to report (and no
    # twenty-title strings in every prompt that shows the user's habits).
    task = LAMP_TASKS["LaMP-1"]
    assert task.output_stats(["A title; Another title"]) == "1 past items, none answered with one of this task's labels."
    assert task.output_stats(["[1]", "[1]", "A title; Another title"]) == "2 past answers; most frequent: [1]: 2."
