"""Base class of every method's options: a frozen dataclass that serialises to plain JSON."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ErasureConfig:
    """Options of one erasure method.

    Subclasses set `method` (the registry key written into saved adapters), `paper`, `default_anchor`,
    `default_preserve` and `edit_scope`, and add typed fields with the defaults of the method's reference
    implementation. Fields declared with `metadata={"serialize": False}` (callbacks, say) are not written to adapter
    files.
    """

    method: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # the method's paper, for model cards
    default_anchor: ClassVar[str] = ""  # what concepts turn into when the caller gives no anchor
    default_preserve: ClassVar[tuple[str, ...]] = ()  # preserved prompts when the caller gives none
    # Which parameters the method's edits may touch (`api._SCOPES`): checked when an adapter file is loaded.
    edit_scope: ClassVar[str] = "text_readers"

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("serialize", True)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ErasureConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            # Written by a newer version of the library, most likely: keep what we understand.
            logger.warning("Ignoring unknown %s options %s.", cls.method, unknown)
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
