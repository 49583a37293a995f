"""Payloads: what one edit adds to one parameter. Each knows how to apply itself, its size and its tensors.

- `LowRank(up, down)`: ΔW = up @ down (a Conv2d weight is edited as its (out, in·kh·kw) matrix).
- `Dense(delta)`: ΔW = delta, any shape (biases, full fine-tuning).
- `TextMap(p, q)`: W → W (I + P Q) for a layer that reads a text pathway, so ΔW = (W P) Q with W the weight as it
  is when the edit is applied. One TextMap is shared by every layer of that pathway (the closed forms of UCE and
  RECE are one map of text-embedding space, `scaling-families.md` §4.1), so it is stored once: 2 × dim × E
  floats for E erased embedding vectors. `q is None` means Q = I (P is then the full dim × dim map P Q).

Every payload is applied as W ← W + ΔW summed in float32, and raises before touching W when ΔW or the sum is not
finite, or the sum leaves float16's range (no real edit does; a corrupt file or a diverged solve would).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


class Delta(ABC):
    """Base class of the payloads. `names` maps each stored tensor name to its field; `optional` names may be
    absent (their field is then None)."""

    type: ClassVar[str]
    names: ClassVar[dict[str, str]]
    optional: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW for `weight` (float32, on the weight's device), shaped as the weight's matrix view."""

    @abstractmethod
    def consistent(self) -> bool:
        """Whether the tensors' shapes fit together (checked when a file is read)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        values = {name: getattr(self, field) for name, field in self.names.items()}
        return {name: value for name, value in values.items() if value is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Delta":
        """Rebuild a payload from its `tensors()` (names checked by the caller)."""
        return cls(**{field: tensors.get(name) for name, field in cls.names.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def apply_(self, weight: torch.Tensor, scale: float = 1.0, what: str = "edit") -> None:
        """W ← W + scale·ΔW in place (float32 sum), all or nothing."""
        add_(weight, self.matrix(weight) * scale if scale != 1.0 else self.matrix(weight), what)

    def to(self, device=None, dtype=torch.float32) -> "Delta":
        return type(self).from_tensors({name: t.to(device, dtype) for name, t in self.tensors().items()})


def _matrix_view(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


# No erasure moves a weight anywhere near float16's largest value; an edit that would is a corrupt file or a
# diverged solve, and it would overflow every float16 copy of the model, so it is refused as not finite.
WEIGHT_LIMIT = float(torch.finfo(torch.float16).max)


def _checked(new: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    limit = max(WEIGHT_LIMIT, float(weight.detach().abs().max()) if weight.numel() else 0.0)
    if not torch.isfinite(new).all() or (new.numel() and float(new.abs().max()) > limit):
        raise FloatingPointError(
            f"The {what} takes weights beyond ±{limit:g} or to NaN/inf; nothing was changed (a corrupt adapter, or "
            "a diverged edit: check its inputs).")
    if weight.dtype != torch.float32 and not torch.isfinite(new.to(weight.dtype)).all():
        raise FloatingPointError(f"The {what} overflows {weight.dtype}; nothing was changed (a float32 pipeline, "
                                 "or a smaller edit, avoids this).")
    return new


def add_(weight: torch.Tensor, delta: torch.Tensor, what: str = "edit") -> None:
    """weight ← weight + delta (delta float32, shaped as the weight or its matrix view), summed in float32."""
    if not torch.isfinite(delta).all():
        raise FloatingPointError(f"The {what} is not finite; nothing was changed.")
    new = _checked(weight.float() + delta.to(weight.device).reshape(weight.shape), weight, what)
    weight.copy_(new.to(weight.dtype))


def check_beside(weight: torch.Tensor, delta: "Delta", scale: float = 1.0, what: str = "edit") -> None:
    """For what runs beside the weights (a membrane's hook adds scale·ΔW x to the layer's output): scale·ΔW must be
    finite and within the weight bound itself, so the hook's output is as finite as the layer's. W is not read
    (fusing checks W + ΔW as every weight edit does)."""
    if isinstance(delta, LowRank):
        up, down = delta.up.float(), delta.down.float()
        if torch.isfinite(up).all() and torch.isfinite(down).all():
            bound = abs(scale) * up.shape[1] * float(up.abs().max()) * float(down.abs().max())
            if bound <= WEIGHT_LIMIT:
                return
    matrix = scale * delta.matrix(weight)
    if not torch.isfinite(matrix).all() or float(matrix.abs().max()) > WEIGHT_LIMIT:
        raise FloatingPointError(f"The {what} is beyond ±{WEIGHT_LIMIT:g} or NaN/inf; nothing was changed (a "
                                 "corrupt adapter, or a diverged edit: check its inputs).")


@dataclass(eq=False)
class LowRank(Delta):
    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in[·kh·kw])
    type: ClassVar[str] = "low_rank"
    names: ClassVar[dict[str, str]] = {"up": "up", "down": "down"}

    def matrix(self, weight):
        return self.up.to(weight.device, torch.float32) @ self.down.to(weight.device, torch.float32)

    def apply_(self, weight, scale=1.0, what="edit"):
        up = self.up.to(weight.device, torch.float32)
        down = self.down.to(weight.device, torch.float32)
        if scale != 1.0:
            up = up * scale
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise FloatingPointError(f"The {what} is not finite; nothing was changed.")
        if weight.dtype == torch.float32:
            view = _matrix_view(weight)
            # |W + up·down| ≤ max|W| + rank·max|up|·max|down|: when that bound is within the limit the sum cannot
            # leave it, so add in one pass with no temporary; otherwise build the sum and check it before it lands.
            bound = float(view.abs().max()) + up.shape[1] * float(up.abs().max()) * float(down.abs().max())
            if bound <= WEIGHT_LIMIT:
                view.addmm_(up, down)
                return
            view.copy_(_checked(torch.addmm(view, up, down), view, what))
            return
        add_(weight, up @ down, what)

    def consistent(self):
        return self.up.dim() == 2 and self.down.dim() == 2 and self.up.shape[1] == self.down.shape[0] > 0

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(eq=False)
class Dense(Delta):
    delta: torch.Tensor
    type: ClassVar[str] = "dense"
    names: ClassVar[dict[str, str]] = {"delta": "delta"}

    def matrix(self, weight):
        return _matrix_view(self.delta.to(weight.device, torch.float32))

    def consistent(self):
        return self.delta.dim() >= 1

    @property
    def rank(self) -> int:
        return min(_matrix_view(self.delta).shape)


@dataclass(eq=False)
class TextMap(Delta):
    p: torch.Tensor  # (dim, E)
    q: torch.Tensor | None  # (E, dim), or None for the identity (then p is dim × dim)
    type: ClassVar[str] = "text_map"
    names: ClassVar[dict[str, str]] = {"P": "p", "Q": "q"}
    optional: ClassVar[frozenset[str]] = frozenset({"Q"})

    def factors(self, weight: torch.Tensor) -> LowRank:
        """The per-layer low-rank form (W P, Q) of this map for `weight` (out × dim)."""
        w = weight.detach().to(torch.float32)
        if w.shape[1] != self.p.shape[0]:
            raise ValueError(f"the layer reads {w.shape[1]}-dim text embeddings but the map is "
                             f"{self.p.shape[0]}-dim")
        p = self.p.to(w.device, torch.float32)
        q = torch.eye(p.shape[1], device=w.device) if self.q is None else self.q.to(w.device, torch.float32)
        return LowRank(w @ p, q)

    def matrix(self, weight):
        return self.factors(weight).matrix(weight)

    def apply_(self, weight, scale=1.0, what="edit"):
        self.factors(weight).apply_(weight, scale, what)

    def consistent(self):
        p, q = self.p, self.q
        if q is None:
            return p.dim() == 2 and p.shape[0] == p.shape[1]
        return p.dim() == 2 and q.dim() == 2 and tuple(q.shape) == (p.shape[1], p.shape[0])

    @property
    def rank(self) -> int:
        return self.p.shape[1]


PAYLOADS: dict[str, type[Delta]] = {cls.type: cls for cls in (LowRank, Dense, TextMap)}
