"""Base class of every method's options: a frozen dataclass that serialises to plain JSON."""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import math
import numbers
import types
import typing
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
    # Recipes by concept type, `erase_concept(..., preset=name)`: {"anchor": default anchor, "preserve": prompts
    # always preserved, "options": config fields}; explicit arguments win.
    presets: ClassVar[dict[str, dict]] = {}
    # The model families (`families.FAMILIES`) the method runs on (None: all), and what to do elsewhere.
    families: ClassVar[tuple[str, ...] | None] = None
    family_note: ClassVar[str] = ""

    def __post_init__(self):
        """Every option has the type its field declares (bools are not numbers; floats are finite); subclasses
        add ranges after calling this."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f"{type(self).__name__}.{f.name}", getattr(self, f.name), hints[f.name])

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("serialize", True)
        }

    @classmethod
    def check_family(cls, family: str) -> None:
        """Raise, naming the families the method runs on, when it does not run on `family`."""
        if cls.families is not None and family not in cls.families:
            raise ValueError(f"The {cls.method} method runs on {', '.join(cls.families)} pipelines, not {family!r}."
                             + (f" {cls.family_note}" if cls.family_note else ""))

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


def _accepts(value, hint) -> bool | None:
    """Whether `value` has type `hint` (None: a type this check does not cover)."""
    if hint is float:  # numbers.Real: numpy scalars too; bools are not numbers here
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        results = [_accepts(value, h) for h in typing.get_args(hint)]
        return None if None in results and not any(results) else any(r for r in results if r)
    if hint is typing.Callable or typing.get_origin(hint) is collections.abc.Callable:
        return callable(value)
    return None


_TYPE_WORDS = {float: "a finite number", int: "an integer", str: "a string", bool: "True or False",
               type(None): "None"}


def check_type(name: str, value, hint) -> None:
    """Raise `TypeError`/`ValueError` naming `name` when `value` is not of the declared type `hint`."""
    if _accepts(value, hint) is not False:
        return
    args = typing.get_args(hint) or (hint,)
    words = " or ".join(_TYPE_WORDS.get(h, "a callable") for h in args)
    error = ValueError if isinstance(value, numbers.Real) and not isinstance(value, bool) else TypeError
    raise error(f"{name} must be {words}, got {value!r}.")
