"""Per-layer low-rank factors under diffusers' LoRA key names: format 1 of our adapter, and `format="lora"` exports.

    unet.<module path>.lora_A.weight   # down, rank × in   (Conv2d: rank × in × kh × kw)
    unet.<module path>.lora_B.weight   # up,   out × rank  (Conv2d: out × rank × 1 × 1)

Stacked erasures that touch the same module are concatenated along the rank (ΔW₁ + ΔW₂ = [B₁ B₂][A₁; A₂]); the
format-1 header (records with `rank` and `modules`) says how to split them back. Plain diffusers
`pipe.load_lora_weights(file); pipe.fuse_lora()` reproduces the edit, since those are its own key names.

`expand` turns any erasure into these per-layer factors: a text map T = I + P Q becomes (W P, Q) for each layer,
with W the layer's weight just before that erasure; every export goes through it.
"""

from __future__ import annotations

import json
from typing import Callable

import torch

from ..deltas import LowRank, TextMap
from ..kinds import Erasure
from .native import METADATA_KEY, check_tensor, erasure_from_record, make_edit, quick_look, record_fields

LORA_FORMAT_VERSION = 1


def module_of(parameter: str) -> str:
    if not parameter.endswith(".weight"):
        raise ValueError(f"{parameter} is not a weight; LoRA factors only hold weight edits (export format='diff' "
                         "or share the adapter file).")
    return parameter.removesuffix(".weight")


def expand(erasures: list[Erasure], base_weight: Callable[[str], torch.Tensor]) -> list[dict[str, LowRank]]:
    """Per-layer low-rank factors `{parameter: LowRank}` of each erasure, in order; `base_weight(parameter)` is the
    value before the first of them. Dense payloads have no low-rank form here and are refused."""
    running: dict[str, torch.Tensor] = {}
    out = []
    for erasure in erasures:
        problem = erasure.edit.export_problem()
        if problem:
            raise ValueError(problem)
        factors = {}
        for name, delta in erasure.edit.deltas.items():
            if isinstance(delta, TextMap):
                factors[name] = delta.factors(running.get(name, base_weight(name)))
            elif isinstance(delta, LowRank):
                factors[name] = delta
            else:
                raise ValueError(f"The {erasure.method} edit of {name} is dense; export it with format='diff'.")
        for name, (delta, scale) in erasure.edit.weight_deltas().items():
            weight = running.get(name, base_weight(name)).detach().float()
            running[name] = weight + scale * delta.matrix(weight).reshape(weight.shape)
        out.append(factors)
    return out


def differences(erasures: list[Erasure], base_weight: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The total change ΔW of every parameter the erasures touch, applied in order (a text map on the weight just
    before it, as when installed); any payload type, biases included. What a `.diff` export holds."""
    running: dict[str, torch.Tensor] = {}
    for erasure in erasures:
        problem = erasure.edit.export_problem()
        if problem:
            raise ValueError(problem)
        for name, delta in erasure.edit.deltas.items():
            weight = running.get(name, base_weight(name).detach().float())
            running[name] = weight + delta.matrix(weight).reshape(weight.shape)
    return {name: (value - base_weight(name).detach().float()).cpu().contiguous() for name, value in running.items()}


def write(erasures: list[Erasure], expanded: list[dict[str, LowRank]], shapes: dict[str, tuple], header: dict):
    """A format-1 state dict (tensors, metadata) of the expanded erasures; `shapes`: each parameter's shape."""
    parts: dict[str, list[torch.Tensor]] = {}
    records = []
    for erasure, factors in zip(erasures, expanded):
        ours = {}
        for name, factor in factors.items():
            ours[f"{module_of(name)}.lora_A.weight"] = factor.down.detach().float().cpu()
            ours[f"{module_of(name)}.lora_B.weight"] = factor.up.detach().float().cpu()
        ours = pad_to_one_rank(ours) if ours else ours
        for key, value in ours.items():
            parts.setdefault(key, []).append(value)
        fields = record_fields(erasure)
        fields.pop("kind")
        rank = max((f.rank for f in factors.values()), default=0)
        records.append({**fields, "rank": rank, "modules": [module_of(n) for n in factors]})
    tensors = {}
    for key, values in parts.items():
        value = torch.cat(values, dim=0 if key.endswith(".lora_A.weight") else 1)
        shape = shapes[key[: -len(".lora_A.weight")] + ".weight"]
        if len(shape) == 4:  # a Conv2d: conv-shaped factors, as diffusers/peft LoRA files hold them
            value = (value.reshape(value.shape[0], *shape[1:]) if key.endswith(".lora_A.weight")
                     else value.reshape(*value.shape, 1, 1))
        tensors[key] = value.contiguous()
    header = {**header, "format_version": LORA_FORMAT_VERSION, "erasures": records}
    header.pop("text_fingerprints", None)
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(header), **quick_look(erasures)}


def format1_header(family: str, record: dict) -> str:
    """The `diffusers_erase` header of a converted foreign file: one record, no fingerprints to check."""
    return json.dumps({"format_version": LORA_FORMAT_VERSION, "family": family, "fingerprints": {},
                       "erasures": [record]})


def pad_to_one_rank(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One record has one rank: pad lower-rank modules with zero rows/columns (the product is unchanged)."""
    rank = max(t.shape[0] for k, t in ours.items() if k.endswith(".lora_A.weight"))
    padded = {}
    for key, value in ours.items():
        if key.endswith(".lora_A.weight") and value.shape[0] < rank:
            value = torch.cat([value, value.new_zeros(rank - value.shape[0], *value.shape[1:])])
        elif key.endswith(".lora_B.weight") and value.shape[1] < rank:
            value = torch.cat([value, value.new_zeros(value.shape[0], rank - value.shape[1], *value.shape[2:])], dim=1)
        padded[key] = value
    return padded


def parse_v1(header: dict, tensors: dict[str, torch.Tensor], source: str) -> list[Erasure]:
    """The erasures of a format-1 state dict, each module's factors sliced out of the rank-concatenated tensors
    (Conv2d factors flattened to matrices). Checks that the tensors and the header agree."""
    offsets: dict[str, int] = {}
    erasures = []
    for index, record in enumerate(header["erasures"]):
        where = f"{source}, erasure {index}"
        rank, modules = record["rank"], record["modules"]  # types checked by schema.check_header
        deltas = {}
        for name in modules:
            down_all = tensors.get(f"{name}.lora_A.weight")
            up_all = tensors.get(f"{name}.lora_B.weight")
            if down_all is None or up_all is None:
                raise ValueError(f"{source} is incomplete: the factors of {name} are missing.")
            for value, part in ((down_all, "lora_A"), (up_all, "lora_B")):
                check_tensor(value, f"{source}: {name}.{part}.weight")
            if down_all.dim() not in (2, 4) or up_all.dim() != down_all.dim() or (
                    up_all.dim() == 4 and tuple(up_all.shape[2:]) != (1, 1)):
                raise ValueError(f"{source}: {name} has factors {tuple(down_all.shape)} / {tuple(up_all.shape)}; "
                                 "expected Linear (2-D) or Conv2d (4-D, lora_B out × rank × 1 × 1) LoRA factors.")
            start = offsets.get(name, 0)
            if down_all.shape[0] != up_all.shape[1] or down_all.shape[0] < start + rank:
                raise ValueError(f"{source} is inconsistent with its header: {name} has {down_all.shape[0]} rank "
                                 f"rows (lora_B {up_all.shape[1]} columns), the records need {start + rank}.")
            down, up = down_all[start: start + rank], up_all[:, start: start + rank]
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            offsets[name] = start + rank
            deltas[f"{name}.weight"] = LowRank(up.float(), down.float())
        erasures.append(erasure_from_record(record, make_edit(record, deltas, None, where)))
    expected = {f"{name}.lora_{ab}.weight" for name in offsets for ab in "AB"}
    leftover = sorted(set(tensors) - expected)
    unused = [n for n, used in offsets.items() if tensors[f"{n}.lora_A.weight"].shape[0] != used]
    if leftover or unused:
        raise ValueError(f"{source} is inconsistent with its header: unexpected tensors {leftover[:3]} or "
                         f"unused rank rows in {unused[:3]}.")
    return erasures
