"""The adapter header's schema: every field a reader relies on, with its type and range, checked in one place so
that a corrupt or hand-edited file is refused with the field at fault named, before anything is built from it.

A field spec is `(what it must be, test)`; `check(obj, spec, where, required)` raises `ValueError` naming the
first field that fails. Shapes are checked against the tensors where the payloads are read (`native.py`,
`lora.py`), and against the pipeline when the erasures are fitted to it (`api._fit`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..kinds import KINDS

Spec = tuple[str, Callable[[Any], bool]]


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def optional(spec: Spec) -> Spec:
    return f"{spec[0]} or null", lambda v: v is None or spec[1](v)


STRING: Spec = ("a string", lambda v: isinstance(v, str))
NAME: Spec = ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
STRINGS: Spec = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
NAMES: Spec = ("a list of non-empty strings",
               lambda v: isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v))
OBJECT: Spec = ("a JSON object", lambda v: isinstance(v, dict))
STRING_MAP: Spec = ("a JSON object of strings",
                    lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
BOOL: Spec = ("true or false", lambda v: isinstance(v, bool))
NUMBER: Spec = ("a finite number", _finite)
SECONDS: Spec = ("a finite number ≥ 0", lambda v: _finite(v) and v >= 0)
COUNT: Spec = ("an integer ≥ 0", lambda v: _integer(v) and v >= 0)
POSITIVE: Spec = ("an integer ≥ 1", lambda v: _integer(v) and v >= 1)
RECORDS: Spec = ("a non-empty list of records (JSON objects)",
                 lambda v: isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v))

FILE = {"format_version": POSITIVE, "family": NAME, "library_version": optional(STRING),
        "base_model": optional(STRING), "fingerprints": optional(STRING_MAP),
        "text_fingerprints": optional(STRING_MAP), "erasures": RECORDS}
RECORD = {"method": NAME, "name": optional(STRING), "concepts": NAMES, "anchors": STRINGS, "preserve": STRINGS,
          "preserve_sha256": STRING, "preserve_count": COUNT, "token_policy": optional(STRING), "options": OBJECT,
          "seconds": SECONDS, "kind": (f"one of {sorted(KINDS)}", lambda v: isinstance(v, str) and v in KINDS),
          "membrane": OBJECT, "guard": OBJECT}
FORMAT1_RECORD = {"rank": POSITIVE, "modules": ("a non-empty list of module names",
                                                lambda v: NAMES[1](v) and bool(v) and len(set(v)) == len(v))}
FORMAT2_RECORD = {"rank": COUNT, "payloads": ("a list of payload entries (JSON objects)",
                                              lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v))}
MEMBRANE = {"prompts": STRINGS, "gated": BOOL, "weight": NUMBER, "fused": BOOL,
            "gate_power": ("a finite number > 0", lambda v: _finite(v) and v > 0)}
GUARD = {"type": NAME, "settings": OBJECT}
PAYLOAD = {"type": NAME, "key": NAME, "tensors": STRINGS,
           "targets": ("a list of parameter names or {\"set\": name, \"count\": n}",
                       lambda v: NAMES[1](v) or (isinstance(v, dict) and NAME[1](v.get("set"))
                                                 and POSITIVE[1](v.get("count"))))}


def check(obj: dict, spec: dict[str, Spec], where: str, required=()) -> None:
    """Raise `ValueError` naming the first field of `obj` that is missing (of `required`) or fails its spec."""
    for name in required:
        if name not in obj:
            raise ValueError(f"{where}: the field `{name}` is missing.")
    for name, (what, test) in spec.items():
        if name in obj and not test(obj[name]):
            raise ValueError(f"{where}: `{name}` must be {what}, got {obj[name]!r}.")


def check_header(header: dict, source: str) -> None:
    """The file-level fields and every record (format 1 or 2) of a `diffusers_erase` header."""
    check(header, FILE, source, required=("family", "erasures"))
    version = header.get("format_version", 1)
    for index, record in enumerate(header["erasures"]):
        where = f"{source}, erasure {index}"
        check(record, RECORD, where, required=("method", "concepts"))
        if version == 1:
            check(record, FORMAT1_RECORD, where, required=("rank", "modules"))
        else:
            check(record, FORMAT2_RECORD, where, required=("payloads",))
            for number, group in enumerate(record["payloads"]):
                check(group, PAYLOAD, f"{where}, payload {number}", required=("type", "key"))
        if "membrane" in record:
            check(record["membrane"], MEMBRANE, f"{where}, membrane", required=("prompts",))
        if "guard" in record:
            check(record["guard"], GUARD, f"{where}, guard", required=("type",))
