"""The `Erasure` record and the three kinds of edit a method can return.

- `WeightEdit`: payloads added to parameters (`deltas.py`), stashed and undone bit-exactly (UCE, RECE, ESD, ...).
- `Membrane`: low-rank factors run beside the weights by forward hooks, each sample gated by its prompt (SPM's
  facilitated transport, `runtime.py`); once fused it adds `weight · up @ down` to the weights like a weight edit.
- `Guard`: acts at sampling time through removable hooks (on prompt embeddings, latents or noise predictions) and
  changes no weight (SAFREE, SLD). A guard class registers itself with `register_guard` so saved files can
  rebuild it.

Code outside this module asks a kind what it does (`weight_deltas`, `runs_beside_weights`, `describe`, `record`)
instead of testing which kind it is.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .deltas import Delta, LowRank, TextMap


class Edit(ABC):
    """Base of the kinds. `deltas` maps `"<component>.<parameter path>"` to a payload."""

    kind: ClassVar[str] = ""
    default_scope: ClassVar[str] = "text_readers"  # what a file's edit of an unknown method may touch (api._SCOPES)
    deltas: dict[str, Delta]

    def weight_deltas(self) -> dict[str, tuple[Delta, float]]:
        """`{parameter: (payload, scale)}` to add to the weights now."""
        return {}

    @property
    def text_space(self) -> bool:
        """True when the edit holds vectors of text-embedding space, which belong to the text encoders it was made
        with (loading checks their fingerprints)."""
        return any(isinstance(d, TextMap) for d in self.deltas.values())

    @property
    def runs_beside_weights(self) -> bool:
        """True when hooks carry (part of) the effect: `runtime.refresh` attaches them."""
        return False

    def beside_deltas(self) -> dict[str, tuple[Delta, float]]:
        """`{parameter: (payload, strength)}` of what the hooks add beside the weights (checked at install as if
        it were added to them)."""
        return {}

    def record(self) -> dict:
        """The kind's own fields for the adapter header."""
        return {}

    @classmethod
    @abstractmethod
    def from_record(cls, record: dict, deltas: dict[str, Delta], tensors: dict, where: str) -> "Edit":
        """Rebuild an edit of this kind from its adapter-header record, its payloads and (guards) its tensors;
        `where` names the file and record in errors."""

    @classmethod
    @abstractmethod
    def describe(cls, record: dict) -> str:
        """One sentence for model cards: what an edit of this kind changes, from its adapter-header record."""

    def export_problem(self) -> str | None:
        """Why this edit cannot be written as static LoRA factors (None: it can)."""
        return None

    @property
    def rank(self) -> int:
        return max((getattr(d, "rank", 0) for d in self.deltas.values()), default=0)

    def cpu(self) -> "Edit":
        """The same edit with its tensors on the CPU (shared payloads stay shared)."""
        moved: dict[int, Delta] = {}
        deltas = {n: moved.setdefault(id(d), d.to("cpu")) for n, d in self.deltas.items()}
        return dataclasses.replace(self, deltas=deltas)


def record_targets(record: dict) -> list[str]:
    """The parameters an adapter-header record edits (a named set, as format 2 writes a text map's layers, counts
    as `<set>` once per layer)."""
    if "modules" in record:  # format 1
        return list(record["modules"])
    out = []
    for group in record.get("payloads") or []:
        targets = group.get("targets")
        out += ([f"<{targets.get('set')}>"] * int(targets.get("count") or 0) if isinstance(targets, dict)
                else list(targets or []))
    return out


def _targets_text(record: dict) -> str:
    groups = record.get("payloads") or []
    if groups and all(isinstance(g.get("targets"), dict) for g in groups):
        return f"every layer that reads the text embeddings ({len(record_targets(record))} layers)"
    return _layers_text(record_targets(record))


def _layers_text(names) -> str:
    names = [n.removesuffix(".weight") for n in names]  # format-1 records list modules, format 2 parameters
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in names})
    components = sorted({n.partition(".")[0] for n in names})
    return f"{len(set(names))} {'/'.join(components)} layers ({', '.join(f'`{s}`' for s in suffixes[:4])}" + (
        ", …)" if len(suffixes) > 4 else ")")


@dataclass(eq=False)
class WeightEdit(Edit):
    deltas: dict[str, Delta]
    kind: ClassVar[str] = "weight_edit"

    @property
    def default_scope(self) -> str:
        """Dense payloads (full-weight imports: ESD files, whole text encoders) may touch what a trained method may
        edit; factored ones, the layers that read text."""
        dense = self.deltas and all(d.type == "dense" for d in self.deltas.values())
        return "trainable" if dense else "text_readers"

    def weight_deltas(self):
        return {name: (delta, 1.0) for name, delta in self.deltas.items()}

    @classmethod
    def from_record(cls, record, deltas, tensors, where):
        return cls(deltas)

    @classmethod
    def describe(cls, record):
        types = [group.get("type") for group in record.get("payloads") or []]
        how = " through one linear map of text-embedding space shared by all of them" if types == ["text_map"] else ""
        return f"An edit of the weights of {_targets_text(record)}{how}."


@dataclass(eq=False)
class Membrane(Edit):
    """`prompts` open the gate; `gated=False` makes it a static adapter at `weight`; `fused`: added to the weights;
    `gate_power`: the strength is weight · γ^gate_power (1: γ scales the product, ours; 2: the SPM reference,
    which scales both factors by γ)."""

    deltas: dict[str, LowRank]
    prompts: list[str]
    gated: bool = True
    weight: float = 1.0
    fused: bool = False
    gate_power: float = 1.0
    kind: ClassVar[str] = "membrane"
    default_scope: ClassVar[str] = "membrane_blocks"

    def weight_deltas(self):
        return {name: (delta, self.weight) for name, delta in self.deltas.items()} if self.fused else {}

    @property
    def runs_beside_weights(self):
        return not self.fused

    def beside_deltas(self):
        return {} if self.fused else {name: (delta, self.weight) for name, delta in self.deltas.items()}

    def record(self):
        return {"membrane": {"prompts": list(self.prompts), "gated": self.gated, "weight": self.weight,
                             "fused": self.fused, "gate_power": self.gate_power}}

    @classmethod
    def from_record(cls, record, deltas, tensors, where):
        if not all(isinstance(d, LowRank) for d in deltas.values()):
            raise ValueError(f"{where}: a membrane holds low-rank factors only.")
        membrane = record.get("membrane")  # field types were checked by the header schema (formats/schema.py)
        if not isinstance(membrane, dict):
            raise ValueError(f"{where} is a membrane without its `membrane` record.")
        prompts, gated = list(membrane["prompts"]), membrane.get("gated", True)
        if gated and not [p for p in prompts if p.strip()]:
            raise ValueError(f"{where}: a gated membrane needs the prompts that open its gate (`membrane.prompts` "
                             "is empty).")
        return cls(deltas, prompts, gated, float(membrane.get("weight", 1.0)), membrane.get("fused", False),
                   float(membrane.get("gate_power", 1.0)))

    @classmethod
    def describe(cls, record):
        membrane = record.get("membrane") or {}
        weight = membrane.get("weight", 1.0)
        text = (f"A membrane (rank-{record.get('rank')} adapter on {_targets_text(record)}) "
                "running beside the weights" + (", fused into them" if membrane.get("fused") else ""))
        if membrane.get("fused"):
            return text + "."
        if membrane.get("gated", True):
            power = membrane.get("gate_power", 1.0)
            gate = "the prompt's gate" if power == 1 else f"the prompt's gate to the power {power}"
            return text + (f"; facilitated transport: strength = weight ({weight}) × {gate}, which opens "
                           "for " + ", ".join(f"`{p}`" for p in membrane.get("prompts", [])) + ".")
        return text + f"; gating off: static strength {weight}."

    def export_problem(self):
        if self.weight != 1.0:
            return ("A membrane on this pipeline has a weight other than 1; exports hold the factors at weight 1 "
                    "(set the strength in A1111/ComfyUI). Call set_erasure_adapters(..., weights=1.0) before "
                    "fusing or exporting.")
        return None


class Guard(Edit):
    """Base of sampling-time guards. A subclass sets `guard_type`, keeps its tensors in `tensors` (saved in adapter
    files) and its plain options in `settings`, and implements `attach(pipe) -> list of removable handles`."""

    kind: ClassVar[str] = "guard"
    guard_type: ClassVar[str] = ""
    text_space: ClassVar[bool] = False  # a guard whose tensors are text-space vectors sets True
    families: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")  # what its hooks understand (checked at attach)

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, settings: dict | None = None):
        self.deltas = {}
        self.tensors = dict(tensors or {})
        self.settings = dict(settings or {})

    @property
    def runs_beside_weights(self):
        return True

    @abstractmethod
    def attach(self, pipe) -> list:
        """Register the guard's hooks on `pipe`, all or none, and return their removable handles."""

    def record(self):
        return {"guard": {"type": self.guard_type, "settings": self.settings}}

    @classmethod
    def from_record(cls, record, deltas, tensors, where):
        spec = record.get("guard") or {}
        guard = GUARDS.get(spec.get("type")) if isinstance(spec, dict) else None
        if guard is None:
            raise ValueError(f"{where} holds a guard of type {spec!r}, which this diffusers-erase does not know; "
                             f"known guards: {sorted(GUARDS) or 'none'}.")
        return guard(tensors, spec.get("settings") or {})

    @classmethod
    def describe(cls, record):
        spec = record.get("guard") or {}
        guard = GUARDS.get(spec.get("type"))
        detail = guard.summary(spec.get("settings") or {}) if guard is not None else ""
        return f"A sampling-time guard (`{spec.get('type')}`) that changes no weight" + (
            f"; {detail}." if detail else ".")

    @classmethod
    def summary(cls, settings: dict) -> str:
        """What the guard acts on, for model cards, from its settings ("" for nothing to add)."""
        return ""

    def export_problem(self):
        return "A guard acts while sampling and changes no weight, so it has no LoRA form; share the adapter file."

    def cpu(self):
        return type(self)({k: v.cpu() for k, v in self.tensors.items()}, self.settings)


GUARDS: dict[str, type[Guard]] = {}
KINDS: dict[str, type[Edit]] = {cls.kind: cls for cls in (WeightEdit, Membrane, Guard)}


def record_kind(record: dict) -> str:
    """The kind a header record names (format-1 records carry none: a membrane has a `membrane` field)."""
    return record.get("kind") or ("membrane" if record.get("membrane") else "weight_edit")


def describe_record(record: dict) -> str:
    """Card text of one adapter-header record, from its kind."""
    kind = record_kind(record)
    return KINDS[kind].describe(record) if kind in KINDS else f"An edit of unknown kind {kind!r}."


def register_guard(cls: type[Guard]) -> type[Guard]:
    """Class decorator: make a `Guard` subclass loadable from adapter files by its `guard_type`.

    Args:
        cls (`type[Guard]`): the guard class; its `guard_type` must be set and unique.
    """
    if not cls.guard_type or cls.guard_type in GUARDS:
        raise ValueError(f"{cls.__name__} needs a unique `guard_type` (got {cls.guard_type!r}).")
    GUARDS[cls.guard_type] = cls
    return cls


@dataclass(eq=False)
class Erasure:
    """One erasure applied to a pipeline: what was erased, how, and the edit itself (`edit`, one of the kinds)."""

    method: str
    concepts: list[str]
    anchors: list[str]
    preserve: list[str]
    options: dict
    edit: Edit = field(repr=False, default=None)
    seconds: float = 0.0
    name: str | None = None  # adapter name (set_erasure_adapters chooses membranes by it)
    # Set when loaded from a file that recorded a long preserve list only as {"preserve_sha256", "preserve_count"}.
    preserve_summary: dict | None = None

    @property
    def modules(self) -> list[str]:
        """The parameters the edit touches, `"<component>.<parameter path>"`."""
        return list(self.edit.deltas)

    @property
    def rank(self) -> int:
        return self.edit.rank

    @property
    def adapter_name(self) -> str:
        return self.name or "default"

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "edit")
        return f"Erasure({fields}, kind={self.edit.kind}, modules=<{len(self.modules)}>, rank={self.rank})"
