"""Pipeline methods: `pipe.erase_concept(...)` and friends, thin callers of `api`.

Stock diffusers pipelines do not inherit `ErasureMixin`, so `enable_erasure(pipe)` gives one pipeline object a
subclass of its own class with the mixin first. The subclass keeps the class name, so `save_pretrained` still
writes a `model_index.json` that plain diffusers can load. Nothing in diffusers is patched.
"""

from __future__ import annotations

from . import api, hub
from .runtime import PromptRecorder, with_mixin


class ErasureMixin(PromptRecorder):
    """Adds concept-erasure methods to a diffusers pipeline class (SD 1.x/2.x, SDXL and their img2img/inpaint).
    Each method is the function of the same name in `diffusers_erase` with the pipeline as first argument."""

    def erase_concept(self, concepts, *, method="uce", anchor=None, preserve=None, adapter_name=None, **options):
        return api.erase_concept(self, concepts, method=method, anchor=anchor, preserve=preserve,
                                 adapter_name=adapter_name, **options)

    def save_erasure_adapter(self, save_directory, weight_name=None, safe_serialization=True):
        return api.save_erasure_adapter(self, save_directory, weight_name, safe_serialization)

    def load_erasure_adapter(self, pretrained_model_name_or_path_or_dict, **kwargs):
        return api.load_erasure_adapter(self, pretrained_model_name_or_path_or_dict, **kwargs)

    def unload_erasure(self):
        api.unload_erasure(self)

    def set_erasure_adapters(self, adapter_names, weights=None, gating=None, unconditional_gate=None,
                             gate_power=None):
        api.set_erasure_adapters(self, adapter_names, weights, gating, unconditional_gate, gate_power)

    def fuse_erasure(self):
        api.fuse_erasure(self)

    def push_erasure_to_hub(self, repo_id, **kwargs):
        return hub.push_erasure_to_hub(self, repo_id, **kwargs)

    def erasure_gates(self, prompts):
        return api.erasure_gates(self, prompts)

    @property
    def erasures(self):
        return api.get_erasures(self)


def enable_erasure(pipe):
    """Give `pipe` the `ErasureMixin` methods, in place; returns `pipe` for chaining.

    Args:
        pipe: a diffusers pipeline of a supported family.
    """
    if pipe is None or not hasattr(pipe, "components"):
        raise TypeError(f"enable_erasure expects a diffusers pipeline, got {type(pipe).__name__}.")
    return with_mixin(pipe, ErasureMixin)
