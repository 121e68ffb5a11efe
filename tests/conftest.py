"""Shared fixtures. The LM is the only part faked, and only in unit tests: SQLite, FAISS, the
embedder, MLflow and HTTP servers are the real ones."""

from __future__ import annotations

import json
import os
import tempfile

# DSPy reads its cache directory at import, and its cache key ignores the engine: tests get a
# fresh one so they never read each other's (or a user's) answers.
os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="dspy_cache_")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest  # noqa: E402

from personaagent.data.tasks import Interaction
from personaagent.program.embedder import default_embedder


@pytest.fixture(scope="session")
def embedder():
    return default_embedder()


# A journalist's headlines in a steady style (Title Case, a colon), oldest first.
HEADLINES = ["Senate Passes Budget: What Comes Next", "Mayor Quits Amid Scandal: Five Questions", "Storm Hits Coast: Towns Brace",
             "Court Blocks Rule: Who Wins Now", "Team Wins Title: A Look Back", "Star Returns Home: Fans Rejoice",
             "Market Falls Again: Why It Matters", "Bridge Reopens Downtown: Traffic Eases",
             "School Board Votes: Parents React", "Factory Closes Doors: Jobs Lost", "Festival Draws Crowds: Streets Fill"]


def interactions(n: int, prefix: str = "item", output: str | None = "5") -> list[Interaction]:
    return [Interaction(f"{prefix} {i}: a review of guitar strings number {i}", output, float(i)) for i in range(n)]


@pytest.fixture
def headline_data(tmp_path):
    """A LaMP-4 folder (LaMP's own format) of one journalist, "hana", with seven past headlines in a
    steady style (Title Case, a colon) and one question, loaded."""
    from personaagent.data import load

    profile = [{"id": str(i), "text": f"story {i} about events", "title": h, "date": f"2020-01-0{i + 1}"}
               for i, h in enumerate(HEADLINES[:7])]
    question = {"id": "q1", "user_id": "hana", "profile": profile,
                "input": "Generate a headline for the following article: story 9 about events"}
    folder = tmp_path / "LaMP-4-sample"
    folder.mkdir()
    (folder / "questions.json").write_text(json.dumps([question]))
    (folder / "outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "q1", "output": "Rain Falls"}]}))
    return load(folder, task="LaMP-4")
