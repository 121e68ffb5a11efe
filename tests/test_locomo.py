import json
import re
from pathlib import Path

import dspy
import pytest
from personaagent.program.testing import FakeEngine

from personaagent.data.locomo import (LocomoQuestion, evidence_recall, load_conversation, load_locomo,
                                      score_answer, token_f1)
from personaagent.experiments.locomo import (answer_questions, bm25_ranker, memory_ranker, recent_window,
                                             stratified_sample)
from personaagent.program.memory import EpisodicMemory

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo"
needs_locomo = pytest.mark.skipif(not LOCOMO.exists(), reason="../shared/data/locomo is not beside this checkout")

# Evidence entries in the source that name no turn (checked by hand): a session too short,
# a bare "D", and a turn past the end of its session.
SOURCE_ERRORS = {("42-58", "D10:19"), ("42-88", "D"), ("47-38", "D4:36")}


@needs_locomo
def test_all_conversations_load_with_their_turns_and_questions():
    conversations = load_locomo(LOCOMO)
    assert len(conversations) == 8
    for conv in conversations:
        raw = json.loads((LOCOMO / f"{conv.id}.json").read_text())
        sessions = [k for k in raw if re.fullmatch(r"session_\d+", k)]
        assert len(conv.turns) == sum(len(raw[s]) for s in sessions)
        ids = [t.metadata["dia_id"] for t in conv.turns]
        assert len(set(ids)) == len(ids) and all(re.fullmatch(r"D\d+:\d+", i) for i in ids)
        # Memory skips an interaction it holds already (same text, answer and time): no turn is one.
        assert len({t.key for t in conv.turns}) == len(conv.turns)
        assert [t.timestamp for t in conv.turns] == sorted(t.timestamp for t in conv.turns)
        speaker = re.compile(r"\[[^\]]+\] (" + "|".join(conv.speakers) + "): ")
        assert all(speaker.match(t.input) for t in conv.turns)
        assert conv.turns[0].input.startswith(f"[{raw['session_1_date_time']}] {raw['session_1'][0]['speaker']}: ")
        assert len(conv.questions) == len(raw["qa"])
        assert {q.category for q in conv.questions} <= {1, 2, 3, 4, 5}
        assert all(q.answer is not None for q in conv.questions if q.category != 5)


@needs_locomo
def test_every_evidence_id_maps_to_a_turn_except_the_counted_source_errors():
    conversations = load_locomo(LOCOMO)
    unresolved = {u for c in conversations for u in c.unresolved_evidence}
    assert unresolved == SOURCE_ERRORS
    for conv in conversations:
        known = {t.metadata["dia_id"] for t in conv.turns}
        assert all(e in known for q in conv.questions for e in q.evidence)
    # Entries holding two ids, or a stray colon, are read as meant.
    q = next(q for q in conversations[0].questions if "D9:17" in q.evidence)
    assert "D8:6" in q.evidence
    assert any("D11:26" in q.evidence for q in conversations[4].questions)


def _tiny_conversation(tmp_path: Path):
    raw = {
        "speaker_a": "Anna", "speaker_b": "Ben",
        "session_1_date_time": "1:00 pm on 3 March, 2023",
        "session_1": [
            {"speaker": "Anna", "dia_id": "D1:1", "text": "I started playing the cello in a community orchestra."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Nice! I spent the weekend fixing my old bicycle."},
            {"speaker": "Anna", "dia_id": "D1:3", "text": "Our first concert is in June."},
        ],
        "session_2_date_time": "9:30 am on 20 April, 2023",
        "session_2": [
            {"speaker": "Ben", "dia_id": "D2:1", "text": "I adopted a puppy named Biscuit last week!",
             "blip_caption": "a photo of a small brown dog"},
            {"speaker": "Anna", "dia_id": "D2:2", "text": "So cute. My sister Clara is visiting from Lisbon."},
        ],
        "session_3_date_time": "10:00 am on 1 May, 2023",  # listed without turns, as in some files
        "qa": [
            {"question": "What is the name of Ben's puppy?", "answer": "Biscuit", "evidence": ["D2:1"], "category": 4},
            {"question": "Which instrument does Anna play and when is her concert?", "answer": "cello, June",
             "evidence": ["D1:1", "D1:3"], "category": 1},
            {"question": "What did Ben name his cat?", "adversarial_answer": "Biscuit", "evidence": ["D2:1"],
             "category": 5},
        ],
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(raw))
    return load_conversation(path)


def test_recall_at_k_on_a_tiny_conversation(tmp_path, embedder):
    conv = _tiny_conversation(tmp_path)
    assert [t.metadata["dia_id"] for t in conv.turns] == ["D1:1", "D1:2", "D1:3", "D2:1", "D2:2"]
    assert conv.turn("D2:1").input == ("[9:30 am on 20 April, 2023] Ben: I adopted a puppy named Biscuit last week! "
                                       "[shares a photo of a small brown dog]")
    puppy, concert, adversarial = conv.questions
    assert adversarial.answer is None and concert.evidence == ("D1:1", "D1:3")

    assert evidence_recall(["D1:3", "D2:2", "D1:1"], concert.evidence, 1) == 0.5
    assert evidence_recall(["D1:3", "D2:2", "D1:1"], concert.evidence, 2) == 0.5
    assert evidence_recall(["D1:3", "D2:2", "D1:1"], concert.evidence, 3) == 1.0
    assert evidence_recall(["D2:2"], puppy.evidence, 5) == 0.0

    memory = EpisodicMemory(tmp_path / "memory", embedder)
    assert len(memory.add(conv.turns)) == len(conv.turns)
    for rank in (memory_ranker(memory), bm25_ranker(conv)):
        ranked = rank(puppy.question, 5)
        assert sorted(ranked) == sorted(t.metadata["dia_id"] for t in conv.turns)
        assert evidence_recall(ranked, puppy.evidence, 1) == 1.0
        assert evidence_recall(ranked, concert.evidence, 5) == 1.0
    memory.close()


def test_recent_window_keeps_the_latest_turns_that_fit(tmp_path):
    conv = _tiny_conversation(tmp_path)
    words = lambda text: len(text.split())  # noqa: E731
    sizes = [words(t.input + "\n") for t in conv.turns]
    assert recent_window(conv, sum(sizes[-2:]), words) == ["D2:1", "D2:2"]
    assert recent_window(conv, sum(sizes), words) == [t.metadata["dia_id"] for t in conv.turns]
    assert recent_window(conv, 1, words) == []


def test_the_answerer_sees_only_the_selected_turns_dated_and_in_order(tmp_path):
    conv = _tiny_conversation(tmp_path)
    engine = FakeEngine({"answer": "Biscuit"})
    lm = dspy.LM("fake/model", engine=engine, cache=False)
    predictions, meter = answer_questions(conv, "memory", lambda question: ["D2:1", "D1:1"], conv.questions[:1], lm)
    assert meter.calls == 1
    assert predictions[0]["prediction"] == "Biscuit" and predictions[0]["score"] == 1.0
    prompt = engine.requests[0]
    cello = prompt.index("[1:00 pm on 3 March, 2023] Anna: I started playing the cello")
    assert cello < prompt.index("[9:30 am on 20 April, 2023] Ben: I adopted a puppy")
    assert "bicycle" not in prompt and "Lisbon" not in prompt


def test_token_f1_on_known_pairs():
    assert token_f1("7 May 2023", "7 May, 2023") == 1.0
    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)  # p = 1, r = 2/3
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "London") == 0.0


def test_scoring_follows_the_locomo_category_rules():
    def q(category, answer):
        return LocomoQuestion("x", "?", answer, category, ())

    # Multi-hop: each comma-separated gold part takes its best predicted part.
    assert score_answer("Sweden, Norway", q(1, "Norway")) == 1.0
    assert score_answer("Norway", q(1, "Norway, Sweden")) == 0.5
    # Open-domain: only the first ';' alternative of the gold counts.
    assert score_answer("psychology", q(3, "Psychology; counseling certification")) == 1.0
    # Adversarial: an abstention is right, anything else wrong.
    assert score_answer("Not mentioned in the conversation", q(5, None)) == 1.0
    assert score_answer("Biscuit", q(5, None)) == 0.0
    assert score_answer("Biscuit", q(4, "Biscuit")) == 1.0


def test_stratified_sample_spreads_over_categories_deterministically():
    questions = [LocomoQuestion(str(i), "?", "a", 1 + i % 3, ()) for i in range(30)] + [
        LocomoQuestion("lone", "?", "a", 5, ())]
    sample = stratified_sample(questions, 7)
    assert sample == stratified_sample(questions, 7)
    assert sorted(q.category for q in sample) == [1, 1, 2, 2, 3, 3, 5]
    assert len({q.id for q in sample}) == 7
    assert len(stratified_sample(questions, 100)) == len(questions)
