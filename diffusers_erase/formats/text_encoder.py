"""A whole text encoder saved by transformers' `save_pretrained` (a `text_encoder/` folder, keys `text_model.…` in
older transformers, bare in newer), as AdvUnlearn and few-shot erasing publish their results: imported as one
dense edit of the pipeline's text encoder, Δ = W_file − W_pipe on every parameter that differs."""

from __future__ import annotations

import torch

from .layout import Layout
from .native import check_tensor
from .partial import dense_adapter

PREFIX = "text_model."
BUFFERS = ("position_ids",)  # saved by older transformers, not parameters


def _parameter(key: str) -> str:
    return f"text_encoder.{key[len(PREFIX):] if key.startswith(PREFIX) else key}"


def is_text_encoder_state_dict(layout: Layout, tensors) -> bool:
    """Every key is a parameter (or known buffer) of the pipeline's first text encoder."""
    keys = [k for k in tensors if not k.endswith(BUFFERS)]
    return bool(keys) and all(_parameter(k) in layout.parameters for k in keys)


def text_encoder_to_adapter(layout: Layout, tensors, metadata, source: str = "text encoder"):
    """The file as one "imported" erasure of dense text-encoder deltas (format 2 tensors and metadata)."""
    weights = {}
    for key, value in tensors.items():
        if key.endswith(BUFFERS):
            continue
        check_tensor(value, f"{source}: {key}")
        name = _parameter(key)
        base = layout.weight(name)
        if tuple(value.shape) != tuple(base.shape):
            raise ValueError(f"{source} does not fit this pipeline's text encoder: {key} is {tuple(value.shape)}, "
                             f"the pipeline's is {tuple(base.shape)}.")
        if not torch.equal(base.detach().cpu().float(), value.float()):
            weights[name] = value
    if not weights:
        raise ValueError(f"{source} is the same text encoder as this pipeline's: there is no edit to import.")
    return dense_adapter(layout, weights, "text_encoder")
