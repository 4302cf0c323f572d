"""The unit of text that the pipeline never cuts across splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class EmptyCorpusError(ValueError):
    """A corpus produced no usable (non-blank) documents."""


@dataclass(frozen=True)
class Document:
    """One unit of text that is never cut across splits: a scene, a play, a story, a record."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
