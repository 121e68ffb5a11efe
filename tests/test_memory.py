import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personaagent.data.tasks import Interaction
from personaagent.program import memory as memory_module
from personaagent.program.embedder import MiniLMEmbedder
from personaagent.program.memory import Cutoff, EpisodicMemory
from personaagent.program.store import UserStore


from conftest import interactions


def test_add_search_delete(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    ids = memory.add([Interaction("I replaced the strings on my Fender guitar", "5"),
                      Interaction("This lipstick dried my lips", "2"),
                      Interaction("The tuner pedal keeps my bass in tune", "4")])
    assert len(ids) == 3 and len(memory) == 3
    found = memory.search("new guitar strings", 1)
    assert found[0].input.startswith("I replaced the strings") and found[0].output == "5"
    assert memory.delete(found[0].id) and len(memory) == 2
    assert all(r.id != found[0].id for r in memory.search("new guitar strings", 3))
    assert not memory.delete(found[0].id)


def test_a_question_searched_twice_or_searched_then_remembered_is_embedded_once(tmp_path, embedder):
    calls = []

    class Counting:
        name, dim = embedder.name, embedder.dim

        def embed(self, texts):
            calls.append(list(texts))
            return embedder.embed(texts)

    memory = EpisodicMemory(tmp_path, Counting())
    memory.add(interactions(5))
    calls.clear()
    first = memory.search("guitar strings number 3", 2)
    assert memory.search("guitar strings number 3", 2) == first and len(calls) == 1
    memory.search("guitar strings number 4", 2)
    assert len(calls) == 2
    # A chat turn's message is searched, then remembered: embedded once, to the vector it would get alone.
    memory.add([Interaction("guitar strings number 4", "a reply")])
    assert len(calls) == 2
    assert memory.search("guitar strings number 4", 1)[0].score == pytest.approx(1.0, abs=1e-5)
    memory.add([Interaction("guitar strings number 5", "a reply")])
    assert calls[-1] == ["guitar strings number 5"]


def test_adding_the_same_interactions_again_adds_nothing(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    assert len(memory.add(interactions(5))) == 5
    assert memory.add(interactions(5)) == []
    assert len(memory.add(interactions(7))) == 2 and len(memory) == 7


def test_stale_or_missing_index_is_rebuilt_from_the_log(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(10))
    memory.flush()
    memory.add(interactions(12))  # not flushed: the index file on disk is now stale
    memory._db.close()  # a crash: no flush
    reopened = EpisodicMemory(tmp_path, embedder)
    assert reopened._index.ntotal == 12
    assert reopened.search("item 11: a review of guitar strings number 11", 1)[0].input.startswith("item 11")
    reopened.close()
    (tmp_path / "episodic.faiss").unlink()
    assert EpisodicMemory(tmp_path, embedder)._index.ntotal == 12


def _cutoff(memory, i):
    """The cutoff of the i-th interaction of `interactions(...)` (its record, at time i)."""
    return Cutoff.of(next(r for r in memory.all() if r.input.startswith(f"item {i}:")))


def test_as_of_hides_the_record_itself_and_later_ones(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(6))
    with memory.as_of(_cutoff(memory, 3)):
        assert [r.input.split(":")[0] for r in memory.all()] == ["item 0", "item 1", "item 2"]
        assert all(int(r.input.split()[1].rstrip(":")) < 3 for r in memory.search("item 5", 6))
    assert len(memory.all()) == 6


def test_as_of_follows_time_not_insertion_order_and_survives_duplicates(tmp_path, embedder):
    """The log differs from the list: items arrive out of time order, one twice, some with no
    time. A replayed interaction sees only what happened strictly before it, never its own record."""
    memory = EpisodicMemory(tmp_path, embedder)
    late, early = Interaction("late review of guitar strings", "5", 50.0), Interaction("early review of picks", "4", 10.0)
    same_time = Interaction("another review of a strap", "3", 50.0)
    memory.add([late, early])
    memory.add([late, same_time, Interaction("untimed note on a capo", "2")])  # `late` again: deduplicated
    assert len(memory) == 4
    with memory.as_of(Cutoff.of(late)):
        assert [r.input for r in memory.all()] == ["early review of picks"]  # not itself, not the same time
        assert {r.input for r in memory.search("late review of guitar strings", 4)} == {"early review of picks"}
        assert {r.input for r in memory.search_text("review guitar strings strap", 4)} == {"early review of picks"}
    with memory.as_of(Cutoff.of(early)):
        assert memory.all() == [] and memory.search("review", 4) == []
    # An interaction not in memory is placed by its time.
    with memory.as_of(Cutoff(None, 20.0)):
        assert [r.input for r in memory.all()] == ["early review of picks"]
    with pytest.raises(ValueError, match="no record in memory and no time"):
        with memory.as_of(Cutoff("unknown", None)):
            pass


def test_large_memories_switch_to_an_inverted_index(tmp_path, embedder, monkeypatch):
    monkeypatch.setattr(memory_module, "IVF_THRESHOLD", 300)
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(320, "note"))
    assert isinstance(faiss.downcast_index(memory._index.index), faiss.IndexIVF) and memory._index.ntotal == 320
    hit = memory.search("note 77: a review of guitar strings number 77", 1)[0]
    assert hit.input.startswith("note 77")
    assert memory.delete(hit.id) and memory._index.ntotal == 319
    with memory.as_of(Cutoff(None, 10.0)):
        assert all(r.timestamp < 10 for r in memory.search("note 300", 5))


def test_search_finds_a_rare_exact_term_that_the_embedding_alone_misses(tmp_path, monkeypatch):
    # MiniLM, a contextual embedder, misses a rare serial (the distilled default, built from token
    # vectors, finds this one; the words still find what any embedding misses).
    embedder = MiniLMEmbedder()
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(30) + [Interaction("Serial QX7Z41 printed on the packet", "3")])
    query = "Which strings were QX7Z41?"
    assert all("QX7Z41" not in r.input for r in memory.search_vector(embedder.embed([query])[0], 3))
    assert any("QX7Z41" in r.input for r in memory.search(query, 2))
    monkeypatch.setattr(memory_module, "LEXICAL_MAX_RECORDS", 30)  # a large memory: embeddings only
    assert all("QX7Z41" not in r.input for r in memory.search(query, 2))


def test_full_text_search_sees_only_visible_and_undeleted_records(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(6))
    assert memory.search_text("number 4", 1)[0].input.startswith("item 4")
    with memory.as_of(_cutoff(memory, 3)):
        assert {r.input.split(":")[0] for r in memory.search_text("number 4 5 2", 6)} == {"item 0", "item 1", "item 2"}
    memory.delete(memory.search_text("number 4", 1)[0].id)
    assert all(not r.input.startswith("item 4") for r in memory.search_text("number 4", 6))
    assert memory.search_text("?!", 3) == []  # no words, no query


def _full_text_work(memory: EpisodicMemory, query: str) -> int:
    """SQLite virtual-machine steps (in thousands) one full-text search takes: a cost measure that,
    unlike a timing, does not depend on the machine."""
    steps = []
    memory._db.set_progress_handler(lambda: steps.append(1), 1000)  # None: go on
    try:
        memory.search_text(query, 4)
    finally:
        memory._db.set_progress_handler(None, 0)
    return len(steps)


def test_a_full_text_search_as_of_a_time_runs_the_match_once(tmp_path, embedder):
    """Filtering by what is visible must not make FTS5 re-run the match once per visible record."""
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(400))
    with memory.as_of(_cutoff(memory, 399)):
        steps = _full_text_work(memory, "a review of guitar strings number 7")
    # Every record matches here, and ranking visits each a few times (about 30 steps a record);
    # re-running the match per visible record took over 1,200 a record.
    assert steps * 1000 < 100 * 400


def test_a_log_from_before_full_text_search_is_indexed_when_opened(tmp_path, embedder):
    memory = EpisodicMemory(tmp_path, embedder)
    memory.add(interactions(4))
    memory._db.executescript("DROP TRIGGER records_text_add; DROP TRIGGER records_text_delete;"
                             "DROP TABLE records_text; DELETE FROM meta WHERE key = 'text_index';")
    memory.close()
    assert EpisodicMemory(tmp_path, embedder).search_text("number 3", 1)[0].input.startswith("item 3")


def test_empty_input_is_refused(tmp_path, embedder):
    with pytest.raises(ValueError, match="interaction 1: 'input' must be a non-empty string"):
        EpisodicMemory(tmp_path, embedder).add([Interaction("ok"), Interaction("  ")])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(["guitar", "strings", "lipstick", "pedal", "amp", "tuner"]), min_size=1, max_size=4),
                min_size=2, max_size=6))
def test_search_never_returns_another_users_record(tmp_path_factory, embedder, per_user_words):
    store = UserStore(tmp_path_factory.mktemp("store"), embedder)
    owners = {}
    for n, words in enumerate(per_user_words):
        user = f"user {n}"
        ids = store.memory(user).add([Interaction(f"{user} wrote about {w} #{i}", w) for i, w in enumerate(words)])
        assert ids
        owners[user] = {r.input for r in store.memory(user).all()}
    for user in owners:
        for query in ["guitar", "lipstick", "amp tuner", "user 0 wrote"]:
            found = store.memory(user).search(query, 10)
            assert found and {r.input for r in found} <= owners[user]
    store.close()


def test_vectors_are_normalized(embedder):
    vectors = embedder.embed(["a guitar", "a lipstick"])
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_records_added_by_another_process_are_found(tmp_path, embedder):
    server = EpisodicMemory(tmp_path, embedder)
    server.add([Interaction("the server saw this first", "1")])
    compiler = EpisodicMemory(tmp_path, embedder)  # e.g. `personaagent compile` in another process
    compiler.add([Interaction("a review of a purple ukulele", "5")])
    compiler.close()
    assert server.search("purple ukulele", 1)[0].input == "a review of a purple ukulele"
    server.add([Interaction("one more from the server", "2")])
    server.close()
    assert EpisodicMemory(tmp_path, embedder)._index.ntotal == 3
