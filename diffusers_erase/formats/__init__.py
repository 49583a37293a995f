"""Formats at the edge: pure converters between safetensors state dicts and `Erasure` records.

No converter touches a pipeline: what they need to know of one (its family row, which modules exist and their
shapes, current weights for imports of full weights) comes in a `Layout`, built by the API layer.

- `native`: our adapter file (format 2: payloads as types, text-space maps stored once; format 1 still reads).
- `lora`: per-layer low-rank factors under diffusers' LoRA key names (format 1's layout; plain
  `load_lora_weights` reads it), and the expansion of any erasure to per-layer factors that every export uses.
- `kohya`, `diff`, `peft`, `partial`: the AUTOMATIC1111/ComfyUI formats, peft folders, and partial weight files
  as UCE's and ESD's reference code write them.
"""

from .layout import Layout

__all__ = ["Layout"]
