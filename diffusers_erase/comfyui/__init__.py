"""ComfyUI node pack: Load Erasure Adapter, Erasure Gate (facilitated transport), Apply Closed-Form Erasure.

Install: `pip install diffusers-erase` into ComfyUI's Python, then create `custom_nodes/diffusers_erase/__init__.py`
holding `from diffusers_erase.comfyui import *` (see docs/comfyui.md). Adapter files go in `models/loras`.

Inside a ComfyUI with the V3 node API (`comfy_api`) this exports `comfy_entrypoint` only; elsewhere the V1
`NODE_CLASS_MAPPINGS`. ComfyUI registers a module's V1 mappings when it has them, so exporting both would hide
the V3 nodes. `from diffusers_erase.comfyui.nodes import NODE_CLASS_MAPPINGS` always works.
"""

from importlib.util import find_spec

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

if find_spec("comfy_api") is not None:
    from .v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
