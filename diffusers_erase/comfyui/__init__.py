"""ComfyUI node pack: Load Erasure Adapter, Erasure Gate (facilitated transport), Apply Closed-Form Erasure.

Install: `pip install diffusers-erase` into ComfyUI's Python, then create `custom_nodes/diffusers_erase/__init__.py`
holding `from diffusers_erase.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS` (see
docs/comfyui.md). Adapter files go in `models/loras`.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
