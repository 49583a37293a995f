"""Install and remove erasures: weight edits (`state.py`) and the hooks of what runs beside the weights
(`runtime.py`), together and all or nothing."""

from __future__ import annotations

import torch

from . import runtime
from .deltas import check_beside
from .kinds import Erasure
from .state import apply_weight_edits, get_parameter, restore_weights, state


@torch.no_grad()
def install(pipe, erasures: list[Erasure]) -> None:
    """Apply `erasures` on top of what `pipe` has. On any failure the weights, records and hooks are as before."""
    check_hooked(pipe, erasures)
    record = state(pipe)
    count, stashed = len(record.erasures), set(record.originals)
    touched = {name for e in erasures for name in e.edit.weight_deltas()}
    # Only what a failed hook refresh would need back: weights an earlier erasure had already changed.
    beside = any(e.edit.runs_beside_weights for e in erasures)
    before = {n: get_parameter(pipe, n).detach().clone() for n in touched & stashed} if beside else {}
    apply_weight_edits(pipe, erasures)
    if not beside:
        return
    try:
        runtime.refresh(pipe)  # builds every hook before swapping them in
    except BaseException:
        del record.erasures[count:]
        for name, value in before.items():
            get_parameter(pipe, name).copy_(value)
        for name in touched - stashed:
            get_parameter(pipe, name).copy_(record.originals.pop(name))
        raise


@torch.no_grad()
def check_hooked(pipe, erasures: list[Erasure]) -> None:
    """What hooks add must be finite and bounded (at strength ≥ 1: it can be raised later)."""
    for erasure in erasures:
        for name, (delta, strength) in erasure.edit.beside_deltas().items():
            check_beside(get_parameter(pipe, name), delta, max(1.0, abs(strength)),
                         f"{erasure.method} membrane on {name}")


@torch.no_grad()
def uninstall(pipe) -> None:
    """Remove every erasure: hooks off, every stashed weight back bit-exactly, no record left."""
    runtime.detach(pipe)
    restore_weights(pipe)


def reinstall(pipe, erasures: list[Erasure]) -> None:
    """Replace everything on `pipe` by `erasures` (re-applied in order, with the same arithmetic); if that fails,
    put back what was there before."""
    previous = list(state(pipe).erasures)
    uninstall(pipe)
    try:
        install(pipe, erasures)
    except BaseException:
        uninstall(pipe)
        install(pipe, previous)
        raise
