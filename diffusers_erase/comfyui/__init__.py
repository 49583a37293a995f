"""ComfyUI node pack: Load Erasure Adapter, Erasure Gate (facilitated transport), Apply Closed-Form Erasure.

Install: `pip install diffusers-erase` into ComfyUI's Python, then create `custom_nodes/diffusers_erase/__init__.py`
holding `from diffusers_erase.comfyui import *` (see docs/comfyui.md). Adapter files go in `models/loras`.

ComfyUI's `nodes.load_custom_node` registers a module's V1 `NODE_CLASS_MAPPINGS` when it has them and only
otherwise calls its V3 `comfy_entrypoint`; a failing entry point registers nothing. So `import *` gets one of the
two: `comfy_entrypoint` inside a ComfyUI whose V3 API (`comfy_api`) imports `v3.py` and accepts its schemas by its
own checks (`ComfyNode.GET_SCHEMA`), else the V1 mappings (with a warning saying why, when `comfy_api` exists).
Both register the same node ids. `from diffusers_erase.comfyui.nodes import NODE_CLASS_MAPPINGS` always works.
"""

import logging
from importlib.util import find_spec

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

logger = logging.getLogger(__name__)


# Why the V3 nodes cannot be registered in this Python (None: they can).
_REFUSAL: str | None = "no comfy_api"
if find_spec("comfy_api") is not None:
    try:
        from . import v3
    except Exception as error:  # a comfy_api without what v3.py uses
        _REFUSAL = f"diffusers_erase.comfyui.v3 does not import ({type(error).__name__}: {error})"
    else:
        _REFUSAL = "; ".join(v3.schema_problems()) or None

if _REFUSAL is None:
    from .v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    if _REFUSAL != "no comfy_api":
        logger.warning("diffusers_erase: ComfyUI's V3 API refuses our nodes (%s); registering the V1 nodes instead.",
                       _REFUSAL)
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
