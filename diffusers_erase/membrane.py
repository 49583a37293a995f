"""Membranes: low-rank adapters that run beside the UNet's weights, each gated per prompt (SPM's facilitated
transport).

A membrane is an `Erasure` with `membrane = {"prompts", "gated", "weight", "fused"}`. Unless fused, its factors
never touch a weight: a forward hook on each adapted Linear/Conv2d adds, for every sample b of the batch,

    Σ_m  w_m · γ_m[b] · up_m (down_m x_b)

to the module's output, where w_m is the membrane's weight (`set_erasure_adapters`) and γ_m[b] ∈ [0, 1] its gate
for the prompt that produced sample b (γ = 1 for a static membrane).

The gate (SPM, "facilitated transport"; reference `infer_spm.py::calculate_matching_score`):

    γ_m(p) = max over e in prompts_m of  max( cos(flat E(p), flat E(e)),  |T(p) ∩ T(e)| / |T(e)| )

E: the text embeddings the UNet reads (full padded sequence), T: the prompt's token ids without special tokens.
Two deliberate differences from the reference code, which multiplies every tensor of a membrane (down, up and
alpha) by γ and sums the tensors of several membranes key by key: here γ scales the product up·down once (the
reference's effective strength is γ², or γ³ counting alpha), and membranes add as products (summed factors
would add cross terms up_i·down_j).

The UNet sees embeddings, not prompts. A forward pre-hook on the UNet computes the cosine term from each row of
`encoder_hidden_states`; the token term comes from the prompts `encode_prompt` encoded last (recorded by
`ErasureMixin.encode_prompt`), matched to rows by exact equality. So each sample of a batch gets its own gate;
under classifier-free guidance its unconditional row gets the same gate by default (`_pair_unconditional_rows`),
or the negative prompt's own with `unconditional_gate="negative_prompt"` ("" has no tokens: only its cosine term
counts). A row that matches no recorded prompt (embeddings passed by hand) gets the cosine term only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .erasure import Erasure, get_module, state

# Modules SPM adapts: every Linear and Conv2d inside the UNet's transformer blocks (Transformer2DModel), as the
# reference's TARGET_REPLACE_MODULE_TRANSFORMER.
_TRANSFORMER_CLASSES = ("Transformer2DModel", "SpatialTransformer")


def membrane_targets(pipe) -> dict[str, nn.Module]:
    """`{"unet.<path>": module}` for every Linear and Conv2d inside a transformer block of the UNet."""
    unet = getattr(pipe, "unet", None)
    found = {}
    if unet is None:
        return found
    for block_name, block in unet.named_modules():
        if type(block).__name__ not in _TRANSFORMER_CLASSES:
            continue
        for name, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if type(module) not in (nn.Linear, nn.Conv2d):
                    raise ValueError(
                        f"unet.{block_name}.{name} is a {type(module).__name__}, not a plain Linear/Conv2d (a LoRA "
                        "adapter is loaded?); call `pipe.unload_lora_weights()` before adding membranes."
                    )
                found[f"unet.{block_name}.{name}"] = module
    return found


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear, (out, in·kh·kw) of a Conv2d: the matrix `up @ down` adds to."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def low_rank_delta(module: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                   scale: torch.Tensor | None, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """up (scale ⊙ down x) for a Linear or Conv2d `module` (down: rank × in[·kh·kw], up: out × rank); `scale` is
    (batch, rank) or None. With `add_to` (the module's output), returns `add_to` + that, added in place for a
    contiguous Linear output (no full-size temporary; not for autograd). Shared by the hooks and SPM training."""
    rank = down.shape[0]
    if isinstance(module, nn.Conv2d):
        kernel = down.reshape(rank, module.in_channels // module.groups, *module.kernel_size)
        h = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation, module.groups)
        if scale is not None:
            h = h * scale.view(scale.shape[0], rank, 1, 1)
        delta = F.conv2d(h, up.reshape(up.shape[0], rank, 1, 1))
        return delta if add_to is None else add_to + delta
    h = F.linear(x, down)
    if scale is not None:
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), rank)
    if add_to is None:
        return F.linear(h, up)
    if add_to.is_contiguous():
        add_to.view(-1, add_to.shape[-1]).addmm_(h.reshape(-1, rank), up.T)
        return add_to
    return add_to + F.linear(h, up)


# ------------------------------------------------------------------------------------------------ gates


@dataclass
class _Gate:
    """What one membrane's gate needs: its prompts' unit-norm flattened embeddings and token sets."""

    embeddings: torch.Tensor  # (prompts, tokens·dim), float32, unit rows
    token_sets: list[set[int]]
    gated: bool
    weight: float


def _special_ids(tokenizer) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def token_sets(pipe, prompts: list[str]) -> list[set[int]]:
    from .targets import text_components

    tokenizer = text_components(pipe)[0][0]
    special = _special_ids(tokenizer)
    return [set(ids) - special for ids in tokenizer(list(prompts), truncation=True)["input_ids"]]


def token_overlap(prompt_tokens: set[int], erased_tokens: set[int]) -> float:
    """|T(p) ∩ T(e)| / |T(e)|: the share of the erased prompt's tokens that the prompt contains."""
    return len(prompt_tokens & erased_tokens) / len(erased_tokens) if erased_tokens else 0.0


def _build_gate(pipe, erasure: Erasure) -> _Gate:
    from .encode import encode

    prompts = list(erasure.membrane.get("prompts") or [])
    gated = bool(erasure.membrane.get("gated", True))
    if gated and not prompts:
        raise ValueError(
            f"The {erasure.method} membrane {erasure.name or ''} has no prompts to gate on; set "
            "`gating=False` in `set_erasure_adapters` to use it as a static adapter, or give its prompts."
        )
    if prompts:
        embeddings = F.normalize(encode(pipe, prompts, full_length=True).flatten(1), dim=1)
        tokens = token_sets(pipe, prompts)
    else:
        embeddings, tokens = torch.zeros(0, 1), []
    return _Gate(embeddings, tokens, gated, float(erasure.membrane.get("weight", 1.0)))


@torch.no_grad()
def compute_gates(gates: list[_Gate], hidden: torch.Tensor, recorded: list,
                  pair_unconditional: bool = False) -> torch.Tensor:
    """(batch, membranes) strengths w·γ for the rows of `encoder_hidden_states`; `recorded` holds
    (embedding row, token overlaps, is negative prompt) for the prompts `encode_prompt` encoded."""
    batch = hidden.shape[0]
    flat = F.normalize(hidden.detach().flatten(1).float(), dim=1)
    # Token terms of rows that are recorded prompts' embeddings (exact copies, made by encode_prompt).
    tokens = torch.zeros(batch, len(gates), device=hidden.device)
    negative_rows = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
    for row, overlaps, negative in recorded:
        if row.shape == hidden.shape[1:] and row.device == hidden.device:
            match = (hidden == row.to(hidden.dtype)).flatten(1).all(dim=1)
            if match.any():
                tokens[match] = torch.maximum(tokens[match], overlaps.to(hidden.device))
                if negative:
                    negative_rows |= match
    columns = []
    for m, gate in enumerate(gates):
        if not gate.gated:
            columns.append(torch.full((batch,), gate.weight, device=hidden.device))
            continue
        if gate.embeddings.shape[1] == flat.shape[1]:
            cosine = (flat @ gate.embeddings.to(flat.device).T).amax(dim=1)
        else:  # another sequence length (e.g. long-prompt embeddings): no cosine term
            cosine = torch.zeros(batch, device=hidden.device)
        columns.append(gate.weight * torch.maximum(cosine, tokens[:, m]).clamp(0.0, 1.0))
    result = torch.stack(columns, dim=1)
    if pair_unconditional:
        _pair_unconditional_rows(result, negative_rows)
    return result


def _overlaps(gates: list[_Gate], prompt_tokens: set[int]) -> torch.Tensor:
    """Token term of one prompt for every membrane (0 for static ones, whose strength is their weight)."""
    return torch.tensor([
        max((token_overlap(prompt_tokens, t) for t in gate.token_sets), default=0.0) if gate.gated else 0.0
        for gate in gates
    ])


def record_prompts(pipe, encode_prompt, args, kwargs, output) -> None:
    """Called by `ErasureMixin.encode_prompt`: remember which prompt each row of its embeddings came from, with
    the token term of every attached membrane, so the UNet hook can gate each sample."""
    record = state(pipe)
    record.recorded = []
    runtime = getattr(pipe.unet, "_membrane_runtime", None)
    if runtime is None:
        return
    try:
        bound = inspect.signature(encode_prompt).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return
    n = int(bound.get("num_images_per_prompt") or 1)
    sources = [(bound.get("prompt"), output[0], False)]
    if bound.get("negative_prompt_embeds") is None:
        # the pipelines encode a missing negative prompt as ""
        sources.append((bound.get("negative_prompt") or "", output[1], True))
    for prompts, embeds, negative in sources:
        if prompts is None or embeds is None:
            continue  # embeddings given by hand: cosine term only
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1 and embeds.shape[0] > n:
            prompts = prompts * (embeds.shape[0] // n)  # one negative prompt for a batch of prompts
        if len(prompts) * n != embeds.shape[0]:
            continue
        for i, prompt_tokens in enumerate(token_sets(pipe, prompts)):
            record.recorded.append((embeds[i * n].detach(), _overlaps(runtime.gates, prompt_tokens), negative))


# ------------------------------------------------------------------------------------------------ hooks


@dataclass
class _Runtime:
    gates: list[_Gate]
    active: bool = True


def _unet_pre_hook(unet, args, kwargs):
    hidden = kwargs.get("encoder_hidden_states")
    if hidden is None and len(args) > 2:
        hidden = args[2]
    runtime = unet._membrane_runtime
    record = unet._erasure_state
    if hidden is None:
        record.gates = None
        return None
    gates = compute_gates(runtime.gates, hidden, record.recorded, record.unconditional_gate == "prompt")
    record.gates = gates
    runtime.active = bool(gates.any())
    return None


def _pair_unconditional_rows(gates: torch.Tensor, negative_rows: torch.Tensor) -> None:
    """Give each unconditional row of a guidance batch the gate of its prompt, in place.

    Guidance computes ε_u + g·(ε_c − ε_u). A membrane acting at γ_c on the prompt's branch and γ_u on the
    unconditional one adds g·(γ_c − γ_u)·Δ to the prediction: its own effect, amplified by the guidance scale, on
    prompts it should leave alone (the empty prompt's cosine gate is high, e.g. 0.89 on the shapes model). With
    one strength on both branches, as SPM training samples and as the reference gates the whole model per
    prompt, that term vanishes. diffusers' SD/SDXL pipelines batch [negative rows; prompt rows]; any other
    layout keeps each row's own gate."""
    half = gates.shape[0] // 2
    if gates.shape[0] % 2 == 0 and negative_rows[:half].all() and not negative_rows[half:].any():
        gates[:half] = gates[half:]


def _module_hook(unet, down: torch.Tensor, up: torch.Tensor, index: torch.Tensor):
    def hook(module, args, output):
        runtime = unet._membrane_runtime
        gates = unet._erasure_state.gates
        if gates is None or not runtime.active:
            return output
        x = args[0]
        scale = gates[:, index]
        if scale.shape[0] != x.shape[0]:
            # A module that sees another batch layout than the UNet input: the strongest gate of the batch,
            # so an erasure never weakens.
            scale = scale.amax(dim=0, keepdim=True).expand(x.shape[0], -1)
        if torch.is_grad_enabled():
            return output + low_rank_delta(module, x, down, up, scale.to(x.dtype))
        return low_rank_delta(module, x, down, up, scale.to(x.dtype), add_to=output)  # in place where it can

    return hook


def detach_membranes(pipe) -> None:
    """Remove every membrane hook (the weights were never touched)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return
    record = state(pipe)
    for handle in record.hooks:
        handle.remove()
    record.hooks.clear()
    record.gates = None
    record.recorded = []
    unet.__dict__.pop("_membrane_runtime", None)


def refresh_membranes(pipe) -> None:
    """(Re)attach the hooks of every unfused membrane on `pipe`, with their current weights and gating. Everything
    is built first; the old hooks are swapped out only when that succeeded."""
    record = state(pipe)
    membranes = [e for e in record.erasures if e.is_gated_membrane]
    if not membranes:
        detach_membranes(pipe)
        return
    gates = [_build_gate(pipe, e) for e in membranes]
    per_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for m, erasure in enumerate(membranes):
        for name, (up, down) in erasure.factors.items():
            per_module.setdefault(name, []).append((m, up, down))
    hooks = []
    unet = pipe.unet
    for name, parts in per_module.items():
        module = get_module(pipe, name)
        weight = module.weight
        down = torch.cat([d for _, _, d in parts]).to(weight.device, weight.dtype)
        up = torch.cat([u for _, u, _ in parts], dim=1).to(weight.device, weight.dtype)
        index = torch.tensor([m for m, _, d in parts for _ in range(d.shape[0])], device=weight.device)
        hooks.append((module, _module_hook(unet, down, up, index)))
    detach_membranes(pipe)
    object.__setattr__(unet, "_membrane_runtime", _Runtime(gates))
    record.hooks.append(unet.register_forward_pre_hook(_unet_pre_hook, with_kwargs=True))
    for module, hook in hooks:
        record.hooks.append(module.register_forward_hook(hook))
    _enable_recording(pipe)


def _enable_recording(pipe) -> None:
    # The token term needs the prompts, which only encode_prompt sees: give the pipeline object our mixin.
    from .mixin import enable_erasure

    if hasattr(pipe, "encode_prompt"):
        enable_erasure(pipe)


def prompt_gates(pipe, prompts: list[str]) -> torch.Tensor:
    """(prompts, membranes) strengths w·γ that the attached membranes would get for these prompts."""
    from .encode import encode

    runtime = getattr(pipe.unet, "_membrane_runtime", None)
    if runtime is None:
        return torch.zeros(len(prompts), 0)
    hidden = encode(pipe, list(prompts), full_length=True)
    tokens = token_sets(pipe, list(prompts))
    recorded = [(row, _overlaps(runtime.gates, t), False) for row, t in zip(hidden, tokens)]
    return compute_gates(runtime.gates, hidden, recorded).cpu()
