"""Partial UNet weight files, as UCE's and ESD's reference code write their results, imported as one exact low-rank
edit of the cross-attention key/value projections."""

from __future__ import annotations

import torch

from .layout import Layout
from .lora import format1_header, pad_to_one_rank
from .native import METADATA_KEY, check_tensor
from .peft import PEFT_PREFIX


def is_partial_weights(tensors) -> bool:
    """UNet parameters saved by name, as ESD and UCE (current code) write their results."""
    return bool(tensors) and all(key.endswith((".weight", ".bias")) and ".lora" not in key and
                                 not key.startswith(("lora_", PEFT_PREFIX)) for key in tensors)


def partial_weights_to_adapter(layout: Layout, tensors, metadata, source: str = "weights file"):
    """A partial UNet state dict (keys `<module path>.weight`, optionally `unet.`-prefixed: UCE's and ESD's output
    files) as one "imported" edit: ΔW = W_file − W_pipe, factored by SVD to the precision the file holds (the
    smallest rank whose reconstruction is within 2 ulp of the file's dtype; full rank when nothing smaller is).
    Only cross-attention key/value weights can be held by an erasure; anything else is refused with the
    diffusers way to load it."""
    projections = layout.text_readers
    ours, modules = {}, []
    for key, value in tensors.items():
        check_tensor(value, f"{source}: {key}")
        name = key if key.startswith("unet.") else f"unet.{key}"
        module, _, part = name.rpartition(".")
        if part != "weight" or module not in projections:
            if name not in layout.parameters:
                raise ValueError(f"{source} holds {key}, which is not a parameter of this pipeline's UNet.")
            current = layout.weight(name)
            if torch.equal(current.detach().cpu().to(value.dtype), value):
                continue  # saved but unchanged (ESD saves every parameter it trains)
            raise ValueError(
                f"{source} changes {key}; an erasure adapter holds cross-attention key/value edits only. Load this "
                "file with `pipe.unet.load_state_dict(weights, strict=False)` (no unload) instead.")
        weight = layout.weight(f"{module}.weight").detach().cpu().float()
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(f"{source} does not fit this pipeline: {key} is {tuple(value.shape)}, the pipeline's "
                             f"is {tuple(weight.shape)}.")
        delta = value.float() - weight
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


