"""The training engine of the trained methods (ESD, few-shot erasing, ...), built once.

Every trained method runs the same loop: draw x_t (partial denoising with guidance through `_denoising.Denoiser`,
which knows every family's sampler and conditioning, or noised images), compare the edited model's prediction
with a target built from frozen predictions, step. The edit is held
*beside* the frozen weights while training, as float32 deltas that forward hooks add to each selected module's
output (W + ΔW, so ΔW x is added): the frozen model is the same modules with the hooks switched off, no copy of
the model is made, the pipeline's weights are never written, and an interrupted or failed run leaves nothing
behind. Hooks run inside the module's call, so they are recomputed under gradient checkpointing too.

`lora_rank=r` trains ΔW = up @ down instead (up zero, down Kaiming-uniform a=√5, as LoRA), on the weights of
matrix-shaped parameters only (biases and norms stay frozen, as in peft). The result is a `WeightEdit` of
`Dense` or `LowRank` payloads on exactly the trained parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn

from ..config import ErasureConfig
from ..deltas import Dense, LowRank
from ..families import denoiser, family_of, matrix_shape
from ..kinds import WeightEdit


@dataclass(frozen=True)
class TrainedConfig(ErasureConfig):
    """Options every trained method has (its own config adds the rest and its reference's defaults).

    Args:
        iterations, lr, seed: optimiser steps, learning rate, and the seed that makes a run deterministic.
        train_method: the parameter group trained (`families.TRAIN_GROUPS`).
        lora_rank: None trains the group's parameters densely; r trains rank-r factors of its weights.
        gradient_checkpointing: recompute the UNet's activations in backward (for real models on small GPUs).
        callback: called as callback(iteration, loss) after each step (not saved).
    """

    iterations: int = 1000
    lr: float = 1e-5
    seed: int = 0
    train_method: str = ""
    lora_rank: int | None = None
    gradient_checkpointing: bool = False
    callback: Callable | None = field(default=None, compare=False, metadata={"serialize": False})

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"{name}.iterations must be a positive integer, got {self.iterations!r}.")
        if not self.lr > 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr!r}.")
        if self.seed < 0:
            raise ValueError(f"{name}.seed must be an integer ≥ 0, got {self.seed!r}.")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"{name}.lora_rank must be a positive integer or None (dense), got {self.lora_rank!r}.")


@dataclass(frozen=True)
class ESDTargetConfig(TrainedConfig):
    """Options of the methods trained on ESD's target with x_t drawn by partial DDIM denoising (ESD, AdvUnlearn).

    Args:
        negative_guidance: η of the target ε(∅) − η(ε(c) − ε(∅)) (1).
        ddim_steps: T, the DDIM steps x_t is drawn from (50).
        start_guidance: the guidance of that denoising (3).
        resolution: training image size in pixels (None: the pipeline's default size).
    """

    negative_guidance: float = 1.0
    ddim_steps: int = 50
    start_guidance: float = 3.0
    resolution: int | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.ddim_steps < 1:
            raise ValueError(f"{name}.ddim_steps must be a positive integer, got {self.ddim_steps!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"{name}.resolution must be a multiple of 8 pixels (≥ 8) or None, got "
                             f"{self.resolution!r}.")


def _delta_output(module: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """What W + ΔW adds to `module`'s output for input x: the module's own operation with ΔW (and Δb) in place of
    its parameters (each of these layers is linear in its parameters)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    if isinstance(module, nn.Embedding):  # padding_idx: its row gets no gradient, as in the module
        return F.embedding(x, weight, module.padding_idx)
    if isinstance(module, nn.LayerNorm):  # n(x)·(w + Δw) + b + Δb − LN(x) = n(x)·Δw + Δb
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    raise TypeError(f"{type(module).__name__} layers cannot be trained by the engine.")


class Trainable:
    """Float32 deltas of the parameters of `modules`, added by forward hooks while `enabled`."""

    def __init__(self, modules: dict[str, nn.Module], lora_rank: int | None, generator: torch.Generator):
        self.enabled = True
        self.deltas: dict[str, dict[str, nn.Parameter]] = {}  # module name -> {"weight"/"bias"/"up"/"down": Δ}
        self.handles = []
        self.lora_rank = lora_rank
        try:
            self._attach(modules, lora_rank, generator)
        except BaseException:
            self.remove()
            raise

    def _attach(self, modules, lora_rank, generator) -> None:
        for name, module in modules.items():
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                raise ValueError(f"{name} renormalises its rows (max_norm={module.max_norm}), which is not linear "
                                 "in its weight; it cannot be trained by adding a delta.")
            # Offloaded weights may sit on the meta device until their forward: keep the deltas on the CPU then.
            device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
            if lora_rank is None:
                own = {p: nn.Parameter(torch.zeros(v.shape, device=device))
                       for p, v in module.named_parameters(recurse=False)}
            elif module.weight.dim() < 2:
                continue  # a norm: no low-rank form, it stays frozen
            else:
                out_features, in_features = matrix_shape(module.weight)
                if lora_rank > min(out_features, in_features):
                    raise ValueError(f"lora_rank={lora_rank} is above the width of {name} ({out_features}×"
                                     f"{in_features}); use at most {min(out_features, in_features)}.")
                down = torch.empty(lora_rank, in_features)
                nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
                own = {"up": nn.Parameter(torch.zeros(out_features, lora_rank, device=device)),
                       "down": nn.Parameter(down.to(device))}
            self.deltas[name] = own
            self.handles.append(module.register_forward_hook(self._hook(own)))

    def _hook(self, own: dict[str, nn.Parameter]):
        def hook(module, args, output):
            if not self.enabled:
                return output
            x = args[0]
            # Under CPU offload the deltas stay where they were made; the step runs where the input is.
            cast = dict(device=output.device, dtype=output.dtype)
            if "up" in own:
                weight = (own["up"] @ own["down"]).reshape(module.weight.shape).to(**cast)
                return output + _delta_output(module, x, weight, None)
            bias = own.get("bias")
            return output + _delta_output(module, x, own["weight"].to(**cast),
                                          None if bias is None else bias.to(**cast))

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for own in self.deltas.values() for p in own.values()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def result(self) -> WeightEdit:
        """The trained deltas as a weight edit (float32, on the CPU), one payload per trained parameter."""
        deltas = {}
        for name, own in self.deltas.items():
            if "up" in own:
                up, down = (own[k].detach().float().cpu() for k in ("up", "down"))
                deltas[f"{name}.weight"] = LowRank(up, down)
            else:
                deltas.update({f"{name}.{p}": Dense(v.detach().float().cpu()) for p, v in own.items()})
        return WeightEdit(deltas)


def denoising_loss(unet, scheduler, x0: torch.Tensor, t, condition: torch.Tensor,
                   noise: torch.Tensor, added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """The diffusion loss ‖ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t, c) − target‖² (target ε, or the velocity
    √ᾱ_t ε − √(1 − ᾱ_t) x_0 for v-prediction), on `scheduler`'s ᾱ; `t` is one timestep or one per sample;
    `added_cond_kwargs`: SDXL's pooled text and time ids."""
    t = torch.as_tensor(t, device=x0.device).reshape(-1).expand(x0.shape[0])
    alpha = scheduler.alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, *[1] * (x0.dim() - 1))
    x_t = (alpha.sqrt() * x0.float() + (1 - alpha).sqrt() * noise.float()).to(x0.dtype)
    prediction = unet(x_t, t, condition.to(unet.dtype), added_cond_kwargs=added_cond_kwargs).sample.float()
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        target = alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * x0.float()
    else:
        target = noise.float()
    return F.mse_loss(prediction, target)


def optimise(pipe, trainable: Trainable, loss_at: Callable[[int], torch.Tensor], config: TrainedConfig,
             optimizer: torch.optim.Optimizer, what: str, total: int | None = None,
             max_grad_norm: float | None = None) -> None:
    """Run `total` (default `config.iterations`) steps of `optimizer` on `loss_at(iteration)` with a progress bar
    and the callback, the gradient norm clipped at `max_grad_norm` if given.
    Float16 models get dynamic loss scaling (the deltas are float32). A non-finite loss stops the run: nothing has
    been applied to the pipeline, and the error names the iteration."""
    model = denoiser(pipe)
    scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
    params = trainable.parameters()
    total = config.iterations if total is None else total
    _, world = processes(pipe)
    if world > 1:
        plain = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
        _same_run(pipe, (what, total, [tuple(p.shape) for p in params], plain))
    with pipe.progress_bar(total=total) as bar:
        for iteration in range(total):
            optimizer.zero_grad(set_to_none=True)
            loss, failure = None, None
            try:
                loss = loss_at(iteration)
                scaler.scale(loss).backward()
            except Exception as error:  # noqa: BLE001 (one process's error must stop every process)
                if world == 1:
                    raise
                failure = error
            value = _agreed_loss(pipe, loss, failure, world, what, iteration)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"{what}: the loss is {value.item()} at iteration {iteration}; training stopped and nothing was "
                    f"applied (every weight is as before). Try a lower `lr` (it was {config.lr:g}).")
            if world > 1:  # data parallel: each process's draws, one averaged step everywhere
                _average_gradients(pipe, params, world)
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if not all(torch.isfinite(p).all() for p in params):
                raise FloatingPointError(
                    f"{what}: the edit diverged to NaN/inf at iteration {iteration}; nothing was applied. Try a lower "
                    f"`lr` (it was {config.lr:g}).")
            value = value.item()
            if config.callback is not None:
                config.callback(iteration, value)
            bar.set_postfix(loss=f"{value:.2e}", refresh=False)
            bar.update()


def processes(pipe) -> tuple[int, int]:
    """(this process's index, the number of processes): several under `accelerate launch` or `torchrun`, where
    `optimise` trains data-parallel; (0, 1) otherwise."""
    state = PartialState(cpu=denoiser(pipe).device.type == "cpu")
    return state.process_index, state.num_processes


def per_process(pipe, generator: torch.Generator, seed: int) -> None:
    """On several processes, reseed `generator` so each draws its own data (x_t, images, noise); call it after the
    trainable's initial weights were drawn, which must be the same everywhere. One process: unchanged."""
    rank, world = processes(pipe)
    if world > 1:
        generator.manual_seed(seed * 1_000_003 + rank + 1)


def _same_run(pipe, fingerprint) -> None:
    """Several processes train one edit together: refuse, on every process, runs that differ (a sweep that gives
    each process its own concept must run its processes apart, not under one launch)."""
    every = [None] * PartialState().num_processes
    torch.distributed.all_gather_object(every, repr(fingerprint))
    if len(set(every)) > 1:
        raise ValueError(f"{fingerprint[0]}: under accelerate/torchrun every process trains the same edit together "
                         "(data parallel), but the processes asked for different runs (method, concepts, options "
                         "or iterations). Give every process the same erase_concept call, or run them apart.")


def _agreed_loss(pipe, loss, failure, world: int, what: str, iteration: int) -> torch.Tensor:
    """The loss averaged over the processes; an error on any process is raised on every one (the others would wait
    for it forever otherwise)."""
    if world == 1:
        return loss.detach().float()
    device = PartialState().device
    value = torch.tensor([float("nan") if loss is None else float(loss.detach()), float(failure is not None)],
                         device=device)
    torch.distributed.all_reduce(value)
    if value[1] > 0:
        if failure is not None:
            raise failure
        raise RuntimeError(f"{what}: another process failed at iteration {iteration}; training stopped on every "
                           "process and nothing was applied.")
    return value[0].cpu() / world


def _average_gradients(pipe, params, world: int) -> None:
    """One all-reduce of every gradient, flattened (on the process's device: the deltas may sit on the CPU under
    offloading)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(PartialState().device)
    torch.distributed.all_reduce(flat)
    flat = (flat / world).cpu() if params[0].device.type == "cpu" else flat / world
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p).to(p.device, p.dtype)


@contextmanager
def training(pipe, trainable: Trainable, checkpointing: bool):
    """While training: the models' own parameters frozen (requires_grad off) and, on request, the denoiser's gradient
    checkpointing on. On exit, whatever happened (an error, Ctrl-C), the flags are put back and the trainable's
    hooks removed, so the pipeline is exactly as before."""
    model = denoiser(pipe)
    models = [model] + [m for m in (getattr(pipe, t.encoder, None) for t in family_of(pipe).text_encoders)
                        if isinstance(m, nn.Module)] + [m for m in (getattr(pipe, "vae", None),)
                                                        if isinstance(m, nn.Module)]
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    switch = checkpointing and not model.is_gradient_checkpointing
    try:
        for module in models:
            module.requires_grad_(False)
        if switch:
            model.enable_gradient_checkpointing()
        yield
    finally:
        trainable.remove()
        for module, module_flags in zip(models, flags):
            for param, flag in zip(module.parameters(), module_flags):
                param.requires_grad_(flag)
        if switch:
            model.disable_gradient_checkpointing()
