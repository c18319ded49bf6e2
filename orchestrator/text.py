"""Text normalisation shared by ingestion, query understanding and the Q2E memory.

The server-only node has no ``asciifolding`` filter (it lives in ``analysis-common``), so
accent folding happens here, identically at index and at query time.
"""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)
_SPACES = re.compile(r"\s+")


def fold(text: str) -> str:
    """Lower-case, strip accents (``Beyoncé`` -> ``beyonce``), keep other characters."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def normalize_query(text: str) -> str:
    """The key a query is remembered under: folded, punctuation dropped, spaces collapsed."""
    return _SPACES.sub(" ", _NON_WORD.sub(" ", fold(text)).replace("_", " ")).strip()
