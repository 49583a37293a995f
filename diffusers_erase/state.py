"""Where the erasures of a pipeline live, and how weights are stashed, edited and restored.

The state lives on the pipeline's denoiser (`pipe.unet`, or `pipe.transformer` for MMDiT families) as
`_erasure_state`. Pipelines that share the denoiser (`from_pipe`, `Cls(**pipe.components)`) share their erasures,
including edits of the text encoders those pipelines share; a replaced denoiser starts clean. Every touched
parameter, of any component, is stashed once (on the CPU) under `"<component>.<parameter path>"` the first time
an edit touches it, so `restore` puts every component back bit-exactly in one pass.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field

import torch

from .families import denoiser
from .kinds import Erasure


@dataclass
class ErasureState:
    """`lock` makes erase/load/unload/fuse/set-adapters of pipelines sharing this denoiser mutually exclusive
    (re-entrant: `fuse` re-installs). `per_call` is thread-local: what one denoising call of one thread needs (the
    prompts its `encode_prompt` recorded, its per-sample gates), so concurrent calls never see each other's."""

    erasures: list[Erasure] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> value before any erasure
    # Runtime (runtime.py): hook handles, which gate the unconditional rows of a guidance batch get, the runtime.
    hooks: list = field(default_factory=list)
    unconditional_gate: str = "prompt"
    runtime: object | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    per_call: threading.local = field(default_factory=threading.local, repr=False)
    # This thread's running pipeline call (`runtime.Call`), apart from `per_call` so a hook refresh keeps it.
    calls: threading.local = field(default_factory=threading.local, repr=False)


_CREATING = threading.Lock()


def state(pipe) -> ErasureState:
    model = denoiser(pipe)  # raises the "supported families" error
    current = model.__dict__.get("_erasure_state")
    if current is None:
        with _CREATING:  # two threads must not each make a state for one denoiser
            current = model.__dict__.get("_erasure_state")
            if current is None:
                current = ErasureState()
                object.__setattr__(model, "_erasure_state", current)
    return current


def exclusive(function):
    """Decorator for functions `f(pipe, ...)` that change or read the erasures: one at a time per state."""
    @functools.wraps(function)
    def wrapper(pipe, *args, **kwargs):
        with state(pipe).lock:
            return function(pipe, *args, **kwargs)

    return wrapper


def get_parameter(pipe, name: str) -> torch.nn.Parameter:
    """The parameter `"<component>.<parameter path>"` of `pipe`; KeyError naming it when there is none."""
    component, _, path = name.partition(".")
    root = getattr(pipe, component, None)
    if root is None or not isinstance(root, torch.nn.Module):
        raise KeyError(name)
    try:
        return root.get_parameter(path)
    except AttributeError:
        raise KeyError(name) from None


def get_module(pipe, name: str) -> torch.nn.Module:
    component, _, path = name.partition(".")
    root = getattr(pipe, component, None)
    if root is None:
        raise KeyError(name)
    return root.get_submodule(path)


@torch.no_grad()
def apply_weight_edits(pipe, erasures: list[Erasure]) -> None:
    """Add every erasure's `weight_deltas` to the weights, in order, all or nothing; records the erasures.

    On any failure every weight is put back as it was and no record is added."""
    record = state(pipe)
    count = len(record.erasures)
    before: dict[str, torch.Tensor] = {}  # weights this call changed that an earlier erasure had changed already
    new_originals: list[str] = []
    try:
        for erasure in erasures:
            for name, (delta, scale) in erasure.edit.weight_deltas().items():
                weight = get_parameter(pipe, name)
                if name not in record.originals:
                    record.originals[name] = weight.detach().to("cpu", copy=True)
                    new_originals.append(name)
                elif name not in before:
                    before[name] = weight.detach().clone()
                delta.apply_(weight.data, scale, f"{erasure.method} edit of {name}")
        record.erasures.extend(erasures)
    except BaseException:
        del record.erasures[count:]
        for name, value in before.items():
            get_parameter(pipe, name).copy_(value)
        for name in new_originals:
            get_parameter(pipe, name).copy_(record.originals.pop(name))
        raise


@torch.no_grad()
def restore_weights(pipe) -> None:
    """Copy back every stashed original (bit-exact) and forget the records."""
    record = state(pipe)
    for name, value in record.originals.items():
        get_parameter(pipe, name).copy_(value)
    record.originals.clear()
    record.erasures.clear()


def base_weight(pipe, name: str) -> torch.Tensor:
    """The value of a parameter before any erasure on `pipe` (the stash, else the live weight)."""
    record = state(pipe)
    return record.originals[name] if name in record.originals else get_parameter(pipe, name).detach()


@contextlib.contextmanager
def temporarily_edited(pipe, deltas: dict):
    """Apply `{parameter: payload}` for the duration of a `with` block (e.g. to score it), then put it back."""
    saved = {name: get_parameter(pipe, name).detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                delta.apply_(get_parameter(pipe, name).data)
        yield pipe
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                get_parameter(pipe, name).copy_(value)


@contextlib.contextmanager
def offload_disabled(pipe):
    """Remove accelerate CPU-offload hooks while weights are read or edited, then put them back (as diffusers'
    LoRA loader does)."""
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    flags = _func_optionally_disable_offloading(pipe)
    model_offload, sequential_offload = flags[0], flags[1]
    if len(flags) > 2 and flags[2]:
        raise ValueError("Group offloading is enabled; disable it before erasing (erasure edits weights in place).")
    # Re-enable on the device the user chose (diffusers records it; its LoRA loader falls back to the default).
    device = {"device": pipe._offload_device} if getattr(pipe, "_offload_device", None) is not None else {}
    try:
        yield
    finally:
        if model_offload:
            pipe.enable_model_cpu_offload(**device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(**device)
