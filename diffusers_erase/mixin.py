"""Pipeline methods: `pipe.erase_concept(...)` and friends, thin callers of `core`.

Stock diffusers pipelines do not inherit `ErasureMixin`, so `enable_erasure(pipe)` gives one pipeline object a
subclass of its own class with the mixin first. The subclass keeps the class name, so `save_pretrained` still
writes a `model_index.json` that plain diffusers can load. Nothing in diffusers is patched.
"""

from __future__ import annotations

from . import core
from .membrane import record_prompts


class ErasureMixin:
    """Adds concept-erasure methods to a diffusers pipeline class (SD 1.x/2.x, SDXL and their img2img/inpaint)."""

    def erase_concept(self, concepts, *, method="uce", anchor=None, preserve=None, adapter_name=None, **options):
        return core.erase_concept(self, concepts, method=method, anchor=anchor, preserve=preserve,
                                  adapter_name=adapter_name, **options)

    def save_erasure_adapter(self, save_directory, weight_name=None, safe_serialization=True):
        return core.save_erasure_adapter(self, save_directory, weight_name, safe_serialization)

    def load_erasure_adapter(self, pretrained_model_name_or_path_or_dict, **kwargs):
        return core.load_erasure_adapter(self, pretrained_model_name_or_path_or_dict, **kwargs)

    def unload_erasure(self):
        core.unload_erasure(self)

    def set_erasure_adapters(self, adapter_names, weights=None, gating=None, unconditional_gate=None):
        core.set_erasure_adapters(self, adapter_names, weights, gating, unconditional_gate)

    def fuse_erasure(self):
        core.fuse_erasure(self)

    def push_erasure_to_hub(self, repo_id, **kwargs):
        from .hub import push_erasure_to_hub

        return push_erasure_to_hub(self, repo_id, **kwargs)

    def erasure_gates(self, prompts):
        return core.erasure_gates(self, prompts)

    def encode_prompt(self, *args, **kwargs):
        # Membranes gate each sample by its prompt, which only this method sees: record it (no-op without them).
        output = super().encode_prompt(*args, **kwargs)
        record_prompts(self, super().encode_prompt, args, kwargs, output)
        return output

    @property
    def erasures(self):
        return core.get_erasures(self)


_SUBCLASSES: dict[type, type] = {}


def enable_erasure(pipe):
    """Give `pipe` the `ErasureMixin` methods, in place; returns `pipe` for chaining."""
    cls = type(pipe)
    if isinstance(pipe, ErasureMixin):
        return pipe
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (ErasureMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    pipe.__class__ = _SUBCLASSES[cls]
    return pipe
