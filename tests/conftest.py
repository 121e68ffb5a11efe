"""Shared fixtures. The LM is the only part faked, and only in unit tests: SQLite, FAISS, the
embedder, MLflow and HTTP servers are the real ones."""

from __future__ import annotations

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


def interactions(n: int, prefix: str = "item", output: str | None = "5") -> list[Interaction]:
    return [Interaction(f"{prefix} {i}: a review of guitar strings number {i}", output, float(i)) for i in range(n)]
