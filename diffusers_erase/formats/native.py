"""Our adapter file: one safetensors file holding every erasure of a pipeline, with a self-describing header.

Format 2 (written since 0.1 of the engine v2). The header (`__metadata__`) holds `format: pt`, `methods` and
`concepts` for a quick look, and under `diffusers_erase` a JSON object: format version, library version, model
family, config fingerprints of the base components, weight fingerprints of the text encoders, and one record
per erasure (method, concepts, anchors, preserve list or its hash, options, seconds, `kind`, and its payloads).
Each payload is a group `{"type", "key", "targets"}` whose tensors are `<key>.<name>`:

    text_map   <key>.P (dim × E), <key>.Q (E × dim, absent for the identity)   targets: every layer that reads text
    low_rank   <key>.up (out × r), <key>.down (r × in)                          targets: one parameter
    dense      <key>.delta (the parameter's shape)                              targets: one parameter
    guard      <key>.<name> for each name in "tensors"                          targets: none

A text map is stored once for all the layers it edits, so a closed-form edit costs 2 × dim × E floats.
Format 1 (per-layer LoRA factors, `formats/lora.py`) still reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..deltas import PAYLOADS, Delta
from ..kinds import KINDS, Erasure, Guard, record_kind
from .schema import check_header

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
METADATA_KEY = "diffusers_erase"
DEFAULT_WEIGHT_NAME = "erasure_adapter.safetensors"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_LONG_PRESERVE = 64  # longer preserve lists are recorded as a hash and a count


def record_fields(erasure: Erasure) -> dict:
    """The header fields every format writes for one erasure (the payloads aside)."""
    preserve = {"preserve": erasure.preserve}
    if erasure.preserve_summary and not erasure.preserve:
        preserve = dict(erasure.preserve_summary)  # re-saving a loaded adapter keeps what it recorded
    elif len(erasure.preserve) > _LONG_PRESERVE:
        digest = hashlib.sha256(json.dumps(erasure.preserve).encode()).hexdigest()
        preserve = {"preserve_sha256": digest, "preserve_count": len(erasure.preserve)}
    return {
        "method": erasure.method,
        "name": erasure.name,
        "concepts": erasure.concepts,
        "anchors": erasure.anchors,
        **preserve,
        "token_policy": erasure.options.get("token_policy"),
        "options": erasure.options,
        "seconds": round(erasure.seconds, 4),
        "kind": erasure.edit.kind,
        **erasure.edit.record(),
    }


def quick_look(erasures: list[Erasure]) -> dict[str, str]:
    return {"methods": ",".join(dict.fromkeys(e.method for e in erasures)),
            "concepts": json.dumps([c for e in erasures for c in e.concepts])}


def write(erasures: list[Erasure], header: dict, named_sets: dict[str, list[str]] | None = None):
    """Tensors and metadata of a format-2 file holding `erasures`; `header` gives the file-level fields.

    A payload whose targets are exactly one of `named_sets` (e.g. "text_readers": every layer that reads the text
    embeddings) records `{"set": name, "count": n}` instead of the list, and is applied to that set of the
    pipeline that loads it: a closed-form edit then costs its tensors and a few hundred bytes of header."""
    named = {tuple(v): k for k, v in (named_sets or {}).items()}
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, erasure in enumerate(erasures):
        groups: dict[int, dict] = {}
        for target, delta in erasure.edit.deltas.items():
            group = groups.get(id(delta))
            if group is None:
                key = f"{i}.{len(groups)}"
                group = groups[id(delta)] = {"type": delta.type, "key": key, "targets": []}
                for name, value in delta.tensors().items():
                    tensors[f"{key}.{name}"] = value.detach().float().cpu().contiguous()
            group["targets"].append(target)
        payloads = list(groups.values())
        for group in payloads:
            name = named.get(tuple(group["targets"]))
            if name is not None and len(group["targets"]) > 1:
                group["targets"] = {"set": name, "count": len(group["targets"])}
        if isinstance(erasure.edit, Guard):
            key = f"{i}.guard"
            payloads.append({"type": "guard", "key": key, "targets": [], "tensors": sorted(erasure.edit.tensors)})
            for name, value in erasure.edit.tensors.items():
                tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
        records.append({**record_fields(erasure), "rank": erasure.rank, "payloads": payloads})
    header = {**header, "format_version": FORMAT_VERSION, "erasures": records}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(header), **quick_look(erasures)}


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; pickles are refused without being opened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} looks like a pickle ({path.suffix}); diffusers-erase never loads pickles because they can run "
            "code. Use a .safetensors adapter (re-save the weights with safetensors.torch.save_file)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); adapters are .safetensors "
                         "files.") from None
    return tensors, metadata


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers in the header must be finite)")


def read_header(metadata: dict[str, str], source: str) -> dict:
    """The `diffusers_erase` header, checked for what every reader relies on."""
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{source} is not a diffusers-erase adapter: its safetensors header has no {METADATA_KEY!r} entry. "
            "Save adapters with `save_erasure_adapter`."
        )
    try:
        header = json.loads(metadata[METADATA_KEY], parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{source} has a corrupt {METADATA_KEY!r} header ({error}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{source}: the {METADATA_KEY!r} header must be a JSON object, got {type(header).__name__}.")
    check_header(header, source)
    version = header.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} uses adapter format {version}, newer than this diffusers-erase reads ({FORMAT_VERSION}); "
            "upgrade with `pip install -U diffusers-erase`."
        )
    return header


def check_tensor(value: torch.Tensor, what: str) -> None:
    """A stored factor must be floating point and finite (`what` names the file and tensor)."""
    if not value.is_floating_point():
        raise ValueError(f"{what} is {value.dtype}; edits are stored as floating-point tensors.")
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} holds NaN or infinite values.")


def check_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> dict | None:
    """What can be checked of any adapter file without a pipeline: our header (if it has one) against the schema,
    and every tensor finite floating point (a kohya `alpha` may be an integer). Returns the header or None."""
    header = read_header(metadata, source) if METADATA_KEY in metadata else None
    for key, value in tensors.items():
        if key.endswith(".alpha") and value.dtype != torch.bool:
            value = value.float()
        check_tensor(value, f"{source}: tensor {key}")
    return header


def make_edit(record: dict, deltas: dict[str, Delta], guard_tensors: dict | None, where: str):
    """The kind object of a record: the file says which kind it is; that kind builds itself."""
    kind = record_kind(record)
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r} ({', '.join(KINDS)}).")
    return KINDS[kind].from_record(record, deltas, guard_tensors or {}, where)


def erasure_from_record(record: dict, edit) -> Erasure:
    return Erasure(
        method=record["method"],
        concepts=list(record.get("concepts", [])),
        anchors=list(record.get("anchors", [])),
        preserve=list(record.get("preserve", [])),
        options=dict(record.get("options", {})),
        edit=edit,
        seconds=float(record.get("seconds", 0.0) or 0.0),
        name=record.get("name"),
        preserve_summary={k: record[k] for k in ("preserve_sha256", "preserve_count") if k in record} or None,
    )


def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "adapter",
          named_sets: dict[str, list[str]] | None = None):
    """`(header, erasures)` of a format-2 state dict; checks the file against itself only (which parameters
    exist and their shapes is the loader's business)."""
    header = read_header(metadata, source)
    used: set[str] = set()
    erasures = []
    for index, record in enumerate(header["erasures"]):
        where = f"{source}, erasure {index}"
        deltas, guard_tensors = {}, None
        payloads = record.get("payloads")
        if not isinstance(payloads, list):
            raise ValueError(f"{where}: `payloads` must be a list, got {payloads!r}.")
        for group in payloads:
            if isinstance(group, dict) and isinstance(group.get("targets"), dict):
                group = {**group, "targets": _expand(group["targets"], named_sets or {}, where)}
            deltas_or_guard = _read_group(group, tensors, used, where)
            if group.get("type") == "guard":
                guard_tensors = deltas_or_guard
            else:
                for target in group["targets"]:
                    if target in deltas:
                        raise ValueError(f"{where} edits {target} twice.")
                    deltas[target] = deltas_or_guard
        edit = make_edit(record, deltas, guard_tensors, where)
        if "rank" in record and record["rank"] != edit.rank:
            raise ValueError(f"{where}: `rank` is {record['rank']!r} but its payloads have rank {edit.rank}.")
        erasures.append(erasure_from_record(record, edit))
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise ValueError(f"{source} is inconsistent with its header: unexpected tensors {leftover[:3]}.")
    return header, erasures


def _expand(spec: dict, named_sets: dict[str, list[str]], where: str) -> list[str]:
    name, count = spec.get("set"), spec.get("count")
    if name not in named_sets:
        raise ValueError(f"{where}: payload targets name the set {name!r}, which this pipeline does not have "
                         f"(known: {sorted(named_sets)}).")
    if count != len(named_sets[name]):
        raise ValueError(f"{where} was made for a model with {count} {name}; this pipeline has "
                         f"{len(named_sets[name])}: load it into a pipeline of the same architecture.")
    return list(named_sets[name])


def _read_group(group, tensors, used: set[str], where: str):
    if not isinstance(group, dict) or not isinstance(group.get("key"), str):
        raise ValueError(f"{where}: corrupt payload entry {group!r}.")
    kind, key, targets = group.get("type"), group["key"], group.get("targets")
    if any(name.startswith(f"{key}.") for name in used):
        raise ValueError(f"{where}: payload key {key!r} is used twice (a duplicated record or payload entry).")
    if kind == "guard":
        names = group.get("tensors") or []
        missing = [n for n in names if f"{key}.{n}" not in tensors]
        if missing:
            raise ValueError(f"{where}: the guard's tensors {missing} are missing.")
        used.update(f"{key}.{n}" for n in names)
        return {n: tensors[f"{key}.{n}"] for n in names}
    payload = PAYLOADS.get(kind)
    if payload is None:
        raise ValueError(f"{where}: unknown payload type {kind!r} ({', '.join(PAYLOADS)}).")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}: payload {key} must name its target parameters, got {targets!r}.")
    if kind != "text_map" and len(targets) != 1:
        raise ValueError(f"{where}: a {kind} payload edits one parameter, {key} names {len(targets)}.")
    found = {n: tensors[f"{key}.{n}"] for n in payload.names if f"{key}.{n}" in tensors}
    missing = sorted(set(payload.names) - payload.optional - set(found))
    if missing:
        raise ValueError(f"{where} is incomplete: payload {key} lacks {missing}.")
    for name, value in found.items():
        check_tensor(value, f"{where}: tensor {key}.{name}")
    used.update(f"{key}.{n}" for n in found)
    delta = payload.from_tensors({n: v.float() for n, v in found.items()})
    if not delta.consistent():
        shapes = {n: tuple(t.shape) for n, t in delta.tensors().items()}
        raise ValueError(f"{where}: payload {key} has inconsistent shapes {shapes}.")
    return delta
