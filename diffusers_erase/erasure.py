"""The `Erasure` record and how a pipeline's weights are edited and restored.

Every weight edit is stored as exact low-rank factors, ΔW = up @ down, applied in place as W ← W + up @ down
(summed in float32).
The original value of each touched weight is kept (once, on the CPU) so that `unload_erasure` restores it
bit-exactly; nothing else of the model is copied.

A membrane (SPM) is an erasure whose factors are not added to the weights but run beside them, gated per prompt;
`membrane.py` attaches and detaches those.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Erasure:
    """One erasure applied to a pipeline: what was erased, how, and the weight edit itself.

    `factors` maps a module name (`"unet.<module path>"`) to `(up, down)` with shapes `(out, rank)` and
    `(rank, in)` (`in` = in_channels·kh·kw for a Conv2d): the edit of that module's weight is `up @ down`.

    `membrane` is None for weight edits (UCE, RECE, ...). For a membrane it is
    `{"prompts": [...], "gated": bool, "weight": float, "fused": bool}`: the prompts that open its gate, whether
    facilitated transport is on (else a static adapter at `weight`), its user weight, and whether it has been
    fused into the weights (then it is a plain weight edit of `weight · up @ down`).
    """

    method: str
    concepts: list[str]
    anchors: list[str]
    preserve: list[str]
    options: dict
    seconds: float = 0.0
    name: str | None = None  # adapter name when loaded from a file
    # Set when loaded from a file that recorded a long preserve list only as {"preserve_sha256", "preserve_count"}.
    preserve_summary: dict | None = None
    membrane: dict | None = None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def is_gated_membrane(self) -> bool:
        """A membrane running beside the weights (not fused): its factors never touch a weight."""
        return self.membrane is not None and not self.membrane.get("fused", False)

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    @property
    def rank(self) -> int:
        return max((down.shape[0] for _, down in self.factors.values()), default=0)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "factors"
        )
        return f"Erasure({fields}, modules=<{len(self.factors)} modules>, rank={self.rank})"


@dataclass
class ErasureState:
    """Lives on the edited UNet as `_erasure_state`, next to the weights it describes: pipelines that share the
    UNet (`from_pipe`, `Cls(**pipe.components)`) share it, and a replaced UNet starts clean."""

    erasures: list[Erasure] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> weight before any erasure
    # Membrane runtime (membrane.py): forward hooks, the per-sample gates of the current UNet call, and the
    # prompts `encode_prompt` encoded last.
    hooks: list = field(default_factory=list)
    gates: torch.Tensor | None = None
    recorded: list = field(default_factory=list)
    # Which gate the unconditional rows of a guidance batch get: their prompt's ("prompt") or their own
    # negative prompt's ("negative_prompt"); see docs/methods/spm.md.
    unconditional_gate: str = "prompt"


def state(pipe) -> ErasureState:
    from .targets import model_family

    unet = getattr(pipe, "unet", None)
    if unet is None:
        model_family(pipe)  # raises the "supported families" error
    current = unet.__dict__.get("_erasure_state")
    if current is None:
        current = ErasureState()
        object.__setattr__(unet, "_erasure_state", current)
    return current


def get_module(pipe, name: str) -> nn.Module:
    component, _, path = name.partition(".")
    root = getattr(pipe, component, None)
    if root is None:
        raise KeyError(name)
    return root.get_submodule(path)


def add_low_rank_(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, what: str = "edit") -> None:
    """W ← W + up @ down, summed in float32; raises before touching W if the result would not be finite.
    A Conv2d weight (out, in, kh, kw) is edited as its (out, in·kh·kw) matrix."""
    if weight.dim() != 2:
        add_low_rank_(weight.view(weight.shape[0], -1), up, down, what)
        return
    up = up.to(weight.device, torch.float32)
    down = down.to(weight.device, torch.float32)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise FloatingPointError(
            f"The {what} is not finite (ill-conditioned solve); use a larger `lamb` or fewer/less similar concepts."
        )
    if weight.dtype == torch.float32:
        weight.addmm_(up, down)  # one pass over W, no temporary
        return
    new = torch.addmm(weight.float(), up, down).to(weight.dtype)
    if not torch.isfinite(new).all():
        raise FloatingPointError(f"The {what} overflows {weight.dtype}; use a larger `lamb` or a float32 pipeline.")
    weight.copy_(new)


@torch.no_grad()
def apply_erasures(pipe, erasures: list[Erasure]) -> None:
    """Apply edits in order and attach membranes, all or nothing: on any failure every weight is put back as it
    was and no membrane is attached."""
    from .membrane import refresh_membranes

    record = state(pipe)
    count = len(record.erasures)
    before: dict[str, torch.Tensor] = {}  # weights this call changed that an earlier erasure had changed already
    new_originals: list[str] = []
    try:
        for erasure in erasures:
            if erasure.is_gated_membrane:
                continue  # runs beside the weights: attached by refresh_membranes
            scale = erasure.membrane.get("weight", 1.0) if erasure.membrane else 1.0  # a fused membrane
            for name, (up, down) in erasure.factors.items():
                weight = get_module(pipe, name).weight
                if name not in record.originals:
                    record.originals[name] = weight.detach().to("cpu", copy=True)
                    new_originals.append(name)
                elif name not in before:
                    before[name] = weight.detach().clone()
                add_low_rank_(weight.data, up * scale if scale != 1.0 else up, down, f"{erasure.method} edit of {name}")
        record.erasures.extend(erasures)
        if any(e.is_gated_membrane for e in erasures):
            refresh_membranes(pipe)  # builds every hook before swapping them in
    except BaseException:
        del record.erasures[count:]
        for name, value in before.items():
            get_module(pipe, name).weight.copy_(value)
        for name in new_originals:
            get_module(pipe, name).weight.copy_(record.originals.pop(name))
        raise


@torch.no_grad()
def restore_originals(pipe) -> None:
    """Undo every erasure: copy back the stored original weights (bit-exact) and forget the records."""
    from .membrane import detach_membranes

    record = state(pipe)
    detach_membranes(pipe)
    for name, value in record.originals.items():
        get_module(pipe, name).weight.copy_(value)
    record.originals.clear()
    record.erasures.clear()


@contextlib.contextmanager
def temporarily_edited(pipe, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Apply an edit for the duration of a `with` block (e.g. to score it), then put the weights back."""
    saved = {name: get_module(pipe, name).weight.detach().clone() for name in factors}
    try:
        with torch.no_grad():
            for name, (up, down) in factors.items():
                add_low_rank_(get_module(pipe, name).weight.data, up, down)
        yield pipe
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                get_module(pipe, name).weight.copy_(value)
