"""Read any supported state dict into `(header, erasures)`: our formats 1 and 2, and the foreign formats (kohya
and SPM LoRAs, `.diff` files, peft folders, partial weight files, whole text encoders), which convert to format 1
(text encoders: format 2) first."""

from __future__ import annotations

import torch

from . import kohya, lora, native, partial, peft, text_encoder
from .layout import Layout


def parse_any(layout: Layout, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str):
    metadata = dict(metadata or {})
    if kohya.is_diff_state_dict(tensors):
        tensors, metadata = kohya.diff_to_adapter(layout, tensors, metadata, source)
    elif kohya.is_kohya_state_dict(tensors):
        tensors, metadata = kohya.kohya_to_adapter(layout, tensors, metadata, source)
    elif peft.is_peft_state_dict(tensors):
        tensors = peft.peft_to_adapter(tensors)
    elif native.METADATA_KEY not in metadata and text_encoder.is_text_encoder_state_dict(layout, tensors):
        tensors, metadata = text_encoder.text_encoder_to_adapter(layout, tensors, metadata, source)
    elif native.METADATA_KEY not in metadata and partial.is_partial_weights(tensors):
        tensors, metadata = partial.partial_weights_to_adapter(layout, tensors, metadata, source)
    header = native.read_header(metadata, source)
    if header.get("family") != layout.family.name:
        raise ValueError(
            f"{source} was made for a {header.get('family')!r} pipeline, but this is a {layout.family.name!r} "
            "pipeline; load an adapter made for the same model family."
        )
    if header.get("format_version", 1) == 1:
        return header, lora.parse_v1(header, tensors, source)
    readers = [f"{name}.weight" for name in layout.text_readers]
    return native.parse(tensors, metadata, source, {"text_readers": readers})
