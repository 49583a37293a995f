"""Partial UNet weight files, as UCE's and ESD's reference code write their results: one exact low-rank edit of the
cross-attention key/value projections when that is all they change, dense deltas otherwise."""

from __future__ import annotations

import torch

from .._version import __version__
from ..deltas import Dense
from ..kinds import Erasure, WeightEdit
from .layout import Layout
from .lora import format1_header, pad_to_one_rank
from .native import METADATA_KEY, check_tensor, write
from .peft import PEFT_PREFIX


def is_partial_weights(tensors) -> bool:
    """UNet parameters saved by name, as ESD and UCE (current code) write their results."""
    return bool(tensors) and all(key.endswith((".weight", ".bias")) and ".lora" not in key and
                                 not key.startswith(("lora_", PEFT_PREFIX)) for key in tensors)


def partial_weights_to_adapter(layout: Layout, tensors, metadata, source: str = "weights file"):
    """A partial UNet state dict (keys `<module path>.weight`, optionally `unet.`-prefixed: UCE's and ESD's output
    files) as one "imported" edit: ΔW = W_file − W_pipe, factored by SVD to the precision the file holds (the
    smallest rank whose reconstruction is within 2 ulp of the file's dtype; full rank when nothing smaller is).
    A file that also changes other parameters (ESD-x trains `to_q`/`to_out`, ESD-u the rest of the UNet; full UNet
    state dicts as the published ESD models) is imported as dense deltas instead (`dense_adapter`)."""
    projections = layout.text_readers
    changed = {}  # parameter -> the file's value, where it differs from the pipeline's
    for key, value in tensors.items():
        check_tensor(value, f"{source}: {key}")
        name = key if key.startswith("unet.") else f"unet.{key}"
        if name not in layout.parameters:
            raise ValueError(f"{source} holds {key}, which is not a parameter of this pipeline's UNet.")
        current = layout.weight(name)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{source} does not fit this pipeline: {key} is {tuple(value.shape)}, the pipeline's "
                             f"is {tuple(current.shape)}.")
        if not torch.equal(current.detach().cpu().to(value.dtype), value):
            changed[name] = value  # (saved but unchanged: ESD saves every parameter it trains)
    if any(name.rpartition(".")[0] not in projections or not name.endswith(".weight") for name in changed):
        return dense_adapter(layout, changed, "partial_weights")  # not a K/V-only edit: dense deltas
    ours, modules = {}, []
    for name, value in changed.items():
        module = name.rpartition(".")[0]
        delta = value.float() - layout.weight(name).detach().cpu().float()
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        # Rounding noise of the saved weights (and of ours) spreads over every singular value at ~eps of the
        # largest; the edit itself sits far above it. Keep what is above, and check that the result holds to a few
        # units in the last place of the file's largest value (dropping the noise moves entries by about that).
        tolerance = 8 * torch.finfo(value.dtype).eps * float(value.float().abs().max())
        rank = max(1, int((s > s[0] * 8 * torch.finfo(value.dtype).eps).sum()))
        if float(((u[:, :rank] * s[:rank]) @ vh[:rank] - delta).abs().max()) > tolerance:
            rank = len(s)  # not low rank at the file's precision: keep it exactly
        ours[f"{module}.lora_A.weight"] = vh[:rank].contiguous()
        ours[f"{module}.lora_B.weight"] = (u[:, :rank] * s[:rank]).contiguous()
        modules.append(module)
    if not ours:
        raise ValueError(f"{source} changes no cross-attention key/value weight of this pipeline.")
    ours = pad_to_one_rank(ours)
    record = {"method": "imported", "name": None, "concepts": [], "anchors": [], "preserve": [],
              "options": {"source_format": "partial_weights"}, "rank": ours[f"{modules[0]}.lora_A.weight"].shape[0],
              "modules": modules, "seconds": 0.0}
    metadata = dict(metadata or {})
    metadata[METADATA_KEY] = format1_header(layout.family.name, record)
    return ours, metadata


def dense_adapter(layout: Layout, weights: dict[str, torch.Tensor], source_format: str):
    """Format-2 tensors and metadata of one "imported" erasure: Dense Δ = W_file − W_pipe for each
    `{parameter: new value}` that differs (full-weight imports: ESD files, whole text encoders)."""
    deltas = {name: value.float() - layout.weight(name).detach().cpu().float() for name, value in weights.items()}
    return dense_delta_adapter(layout, deltas, source_format)


def dense_delta_adapter(layout: Layout, deltas: dict[str, torch.Tensor], source_format: str, concepts=()):
    """Format-2 tensors and metadata of one "imported" erasure of the `{parameter: Δ}` that are not zero."""
    edit = WeightEdit({name: Dense(delta) for name, delta in deltas.items() if delta.any()})
    erasure = Erasure(method="imported", concepts=list(concepts), anchors=[], preserve=[],
                      options={"source_format": source_format}, edit=edit)
    return write([erasure], {"library_version": __version__, "family": layout.family.name})
