"""The embedders, and memories opened with an embedder other than the one that built them: real
models (the distilled one is built into the cache once if missing), SQLite and FAISS."""

import logging

import numpy as np
import pytest

from personaagent.data.tasks import Interaction
from personaagent.program.embedder import MiniLMEmbedder, Model2VecEmbedder
from personaagent.program.memory import EpisodicMemory

TEXTS = ["my flight to Lisbon was cancelled and the airline owes me a refund",
         "a recipe for sourdough bread with a long cold rise",
         "the guitar strings I bought squeak when I slide between frets"]


@pytest.fixture(scope="session")
def fast():
    return Model2VecEmbedder()  # distilled from the shipped MiniLM here if the cache has none yet


@pytest.fixture(scope="session")
def minilm():
    return MiniLMEmbedder()


def best_match(memory: EpisodicMemory, embedder, text: str):
    """The embedding search's top record for `text`, with its cosine (1.0: the same model's vector of it)."""
    return memory.search_vector(embedder.embed([text])[0], 1)[0]


def test_the_fast_embedder_gives_unit_vectors_of_its_dimension(fast):
    vectors = fast.embed(["a guitar", "a lipstick", "strings"])
    assert vectors.dtype == np.float32 and vectors.shape == (3, fast.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert fast.embed([]).shape == (0, fast.dim)


def test_the_fast_embedder_ranks_a_paraphrase_above_an_unrelated_text(fast):
    query, paraphrase, unrelated = fast.embed(["how do I reset my password",
                                               "I forgot my login password and need to change it",
                                               "two cups of flour and a pinch of salt"])
    assert query @ paraphrase > query @ unrelated + 0.1


def test_a_memory_built_with_another_embedder_is_re_embedded_from_its_log(tmp_path, minilm, fast, caplog):
    EpisodicMemory(tmp_path, minilm).add([Interaction(t, "5") for t in TEXTS])
    with caplog.at_level(logging.WARNING):
        reopened = EpisodicMemory(tmp_path, fast)
    assert f"embedded with {minilm.name}, opened with {fast.name}: re-embedding its 3 records" in caplog.text
    found = best_match(reopened, fast, TEXTS[1])
    assert found.input == TEXTS[1] and found.score == pytest.approx(1.0, abs=1e-4)
    reopened.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = EpisodicMemory(tmp_path, fast)  # now the fast embedder's: nothing to redo
    assert "re-embedding" not in caplog.text and best_match(again, fast, TEXTS[2]).input == TEXTS[2]


def test_a_memory_that_recorded_no_embedder_counts_as_minilms(tmp_path, minilm, fast, caplog):
    memory = EpisodicMemory(tmp_path, minilm)
    memory.add([Interaction(t) for t in TEXTS])
    memory._db.execute("DELETE FROM meta WHERE key = 'embedder'")  # as written before embedders had names
    memory.close()
    with caplog.at_level(logging.WARNING):
        EpisodicMemory(tmp_path, minilm).close()
    assert "re-embedding" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert best_match(EpisodicMemory(tmp_path, fast), fast, TEXTS[0]).input == TEXTS[0]
    assert f"embedded with {minilm.name}, opened with {fast.name}" in caplog.text


def test_two_processes_with_different_embedders_never_mix_vectors(tmp_path, minilm, fast):
    server = EpisodicMemory(tmp_path, minilm)
    server.add([Interaction(TEXTS[0])])
    compiler = EpisodicMemory(tmp_path, fast)  # re-embeds the log with its model, then adds its own
    compiler.add([Interaction(TEXTS[1])])
    # The server's next search finds the fast model's vectors in the log: it re-embeds them with its own.
    found = best_match(server, minilm, TEXTS[1])
    assert found.input == TEXTS[1] and found.score == pytest.approx(1.0, abs=1e-4)
    compiler.add([Interaction(TEXTS[2])])  # re-embeds again inside its write, so the new vector joins its kind
    found = best_match(compiler, fast, TEXTS[0])
    assert found.input == TEXTS[0] and found.score == pytest.approx(1.0, abs=1e-4)
    server.close()
    compiler.close()
