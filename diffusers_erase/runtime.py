"""The runtime: hooks for every erasure that acts beside the weights, membranes (SPM's facilitated transport,
each sample gated by its prompt) and guards (`kinds.Guard`, which attach their own hooks).

A membrane is an erasure whose edit is a `kinds.Membrane` (prompts, gated, weight, fused). Unless fused, its factors
never touch a weight: a forward hook on each adapted Linear/Conv2d adds, for every sample b of the batch,

    Σ_m  w_m · γ_m[b] · up_m (down_m x_b)

to the module's output, where w_m is the membrane's weight (`set_erasure_adapters`) and γ_m[b] ∈ [0, 1] its gate
for the prompt that produced sample b (γ = 1 for a static membrane), raised to the membrane's `gate_power`.

The gate (SPM, "facilitated transport"; reference `infer_spm.py::calculate_matching_score`):

    γ_m(p) = max over e in prompts_m of  max( cos(flat E(p), flat E(e)),  |T(p) ∩ T(e)| / |T(e)| )

E: the text embeddings the UNet reads (full padded sequence), T: the prompt's token ids without special tokens.
Two differences from the reference code, which multiplies every tensor of a membrane (down, up and the unused
alpha buffer) by γ and sums the tensors of several membranes key by key: here γ scales the product up·down once
(the reference's effective strength is γ²: `gate_power=2` reproduces it, docs/methods/spm.md), and membranes add
as products (summed factors would add cross terms up_i·down_j).

The UNet sees embeddings, not prompts. A forward pre-hook on the UNet computes the cosine term from each row of
`encoder_hidden_states`; the token term comes from the prompts `encode_prompt` encoded in this pipeline call
(recorded by `PromptRecorder.encode_prompt`), matched to rows by exact equality. So each sample of a batch gets its
own gate; under classifier-free guidance its unconditional row gets the same gate by default
(`_pair_unconditional_rows`; FLUX's true CFG runs the negative prompt as a call of its own, which takes the gates of
the prompt's call before it),
or the negative prompt's own with `unconditional_gate="negative_prompt"` ("" has no tokens: only its cosine term
counts). A row that matches no recorded prompt (embeddings passed by hand) gets the cosine term only.

The recorded prompts and the gates of a call are kept per thread (`ErasureState.per_call`, a `threading.local`),
so concurrent generations through one UNet each use their own (docs/threads.md).
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .families import denoiser, family_of, max_sequence_length, module_of, runs_fused
from .kinds import Erasure, Guard, Membrane
from .state import get_module, state
from .text import encode, token_overlap, token_sets

logger = logging.getLogger(__name__)


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
    power: float = 1.0


def _build_gate(pipe, erasure: Erasure) -> _Gate:
    membrane = erasure.edit
    prompts, gated = list(membrane.prompts), membrane.gated
    if gated and not prompts:
        raise ValueError(
            f"The {erasure.method} membrane {erasure.name or ''} has no prompts to gate on; set "
            "`gating=False` in `set_erasure_adapters` to use it as a static adapter, or give its prompts."
        )
    if prompts:
        with max_sequence_length(erasure.options.get("max_sequence_length")):  # T5: the length it was made for
            embeddings = F.normalize(encode(pipe, prompts, full_length=True).flatten(1), dim=1)
        tokens = token_sets(pipe, prompts)
    else:
        embeddings, tokens = torch.zeros(0, 1), []
    return _Gate(embeddings, tokens, gated, float(membrane.weight), float(membrane.gate_power))


@torch.no_grad()
def compute_gates(gates: list[_Gate], hidden: torch.Tensor, recorded: list,
                  pair_unconditional: bool = False, previous: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, membranes) strengths w·γ for the rows of `encoder_hidden_states`; `recorded` holds
    (embedding row, token overlaps, is negative prompt) for the prompts `encode_prompt` encoded; `previous`: the
    gates of the denoiser call before this one in the same pipeline call (a negative-only call takes them)."""
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
        columns.append(gate.weight * torch.maximum(cosine, tokens[:, m]).clamp(0.0, 1.0) ** gate.power)
    result = torch.stack(columns, dim=1)
    if pair_unconditional:
        if negative_rows.all() and previous is not None and previous.shape == result.shape:
            return previous.clone()  # FLUX's true CFG: the negative branch is its own call, after the prompt's
        _pair_unconditional_rows(result, negative_rows)
    return result


def _overlaps(gates: list[_Gate], prompt_tokens: set[int]) -> torch.Tensor:
    """Token term of one prompt for every membrane (0 for static ones, whose strength is their weight)."""
    return torch.tensor([
        max((token_overlap(prompt_tokens, t) for t in gate.token_sets), default=0.0) if gate.gated else 0.0
        for gate in gates
    ])


def _prompt_sources(bound: dict, output) -> list[tuple[list[str], torch.Tensor, bool, int]]:
    """(prompts, their embeddings, is the negative prompt, images per prompt) of one `encode_prompt` call (its
    `bound` arguments); a source whose embeddings were given by hand (no text) is left out."""
    n = int(bound.get("num_images_per_prompt") or 1)
    sources = [(bound.get("prompt"), output[0], False)]
    if bound.get("negative_prompt_embeds") is None:
        # the pipelines encode a missing negative prompt as ""
        sources.append((bound.get("negative_prompt") or "", output[1], True))
    found = []
    for prompts, embeds, negative in sources:
        if prompts is None or embeds is None:
            continue
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1 and embeds.shape[0] > n:
            prompts = prompts * (embeds.shape[0] // n)  # one negative prompt for a batch of prompts
        if len(prompts) * n == embeds.shape[0]:
            found.append((prompts, embeds.detach(), negative, n))
    return found


def record_prompts(pipe, encode_prompt, args, kwargs, output) -> None:
    """Called by `PromptRecorder.encode_prompt`: remember which prompt each row of its embeddings came from, for
    the guards of this call (`Call.prompts`) and, with the token term of every attached membrane, for the denoiser
    hook that gates each sample."""
    record = state(pipe)
    call = current_call(record)
    if call is None or call.encodes == 0:
        # this thread's prompts only (state.ErasureState.per_call); one pipeline call may encode several times
        # (FLUX encodes its negative prompt in a second call)
        record.per_call.recorded, record.per_call.last_gates = [], None
    if call is not None:
        call.encodes += 1
    runtime = record.runtime
    if runtime is None:
        return
    try:
        bound = inspect.signature(encode_prompt).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = None
    sources = _prompt_sources(bound, output) if bound is not None else []
    if call is not None and call.encodes > 1:  # a later encoding of the call's negative prompt (FLUX)
        sources = [(p, e, negative or _is_negative(call, p), n) for p, e, negative, n in sources]
    if call is not None:
        call.prompts.extend(sources)
        call.rows = output[0].shape[0] if torch.is_tensor(output[0]) else None
        # the guards encode their own text as this prompt was encoded
        call.encoding = {k: bound[k] for k in ("clip_skip", "lora_scale") if (bound or {}).get(k) is not None}
    if not runtime.gates:
        return
    for prompts, embeds, negative, n in sources:
        for i, prompt_tokens in enumerate(token_sets(pipe, prompts)):
            record.per_call.recorded.append((embeds[i * n], _overlaps(runtime.gates, prompt_tokens), negative))


def _is_negative(call: "Call", prompts: list[str]) -> bool:
    """Whether `prompts` are the call's negative prompt (the pipelines encode a missing one as "")."""
    negative = call.negative if call.negative is not None else ""
    negative = [negative] if isinstance(negative, str) else list(negative)
    return set(prompts) <= set(negative)


class PromptRecorder:
    """Pipeline mixin: the token term of a gate and the guards need the prompts, which only `encode_prompt` sees;
    guards also need to know which denoising step of which call they are in (`Call`)."""

    def __call__(self, *args, **kwargs):
        record = state(self)
        arguments = _call_arguments(self, args, kwargs)
        warn_sequence_length(record, arguments)
        outer = getattr(record.calls, "call", None)
        record.calls.call = Call(self, negative=arguments.get("negative_prompt"))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            record.calls.call = outer

    def encode_prompt(self, *args, **kwargs):
        output = super().encode_prompt(*args, **kwargs)
        record_prompts(self, super().encode_prompt, args, kwargs, output)
        return output


def _call_arguments(pipe, args, kwargs) -> dict:
    """The pipeline call's arguments with its defaults (empty when they do not bind)."""
    try:
        call = next(c.__call__ for c in type(pipe).__mro__
                    if "__call__" in vars(c) and not issubclass(c, PromptRecorder))
        bound = inspect.signature(call).bind(pipe, *args, **kwargs)
    except (StopIteration, TypeError, ValueError):
        return {}
    bound.apply_defaults()
    return bound.arguments


def warn_sequence_length(record, arguments: dict) -> None:
    """Log when a FLUX call pads T5 to another length than an erasure on the pipeline was made for: T5 is
    unmasked, so every token embedding then differs from those the edit was fitted to."""
    made = {e.options.get("max_sequence_length") for e in record.erasures} - {None}
    if not made:
        return
    used = arguments.get("max_sequence_length")
    if used is not None and made != {used}:
        logger.warning("This call pads T5 to max_sequence_length=%s, but the erasures on this pipeline were made "
                       "for %s; every T5 token embedding differs from those they were fitted to, so the erasure may "
                       "be weaker. Call with max_sequence_length=%s, or erase again with max_sequence_length=%s.",
                       used, sorted(made), sorted(made)[0], used)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def with_mixin(pipe, mixin: type):
    """Give the pipeline object a subclass of its own class with `mixin` first, in place (nothing in diffusers is
    patched). The subclass keeps the class name, so `save_pretrained` writes a `model_index.json` that plain
    diffusers loads."""
    cls = type(pipe)
    if isinstance(pipe, mixin):
        return pipe
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__})
    pipe.__class__ = _SUBCLASSES[key]
    return pipe


# ------------------------------------------------------------------------------------------------ hooks


@dataclass
class _Runtime:
    gates: list[_Gate]


# ------------------------------------------------------------------------------------------------ guards' calls


@dataclass
class Call:
    """One pipeline call on one thread, as the guards see it: the pipeline running (which may be another than the
    one a guard was attached through: pipelines share the UNet), the denoiser calls made so far (`step`: one per
    denoising step in diffusers' SD/SDXL pipelines), the prompts its `encode_prompt` encoded (`_prompt_sources`),
    and what each guard keeps between steps (`data`, by guard)."""

    pipe: object
    negative: object = None  # the call's `negative_prompt` argument
    encodes: int = 0  # `encode_prompt` calls made so far
    step: int = 0
    prompts: list = field(default_factory=list)
    rows: int | None = None  # rows of the last `encode_prompt`'s prompt embeddings (given by hand or not)
    encoding: dict = field(default_factory=dict)  # its `clip_skip` / `lora_scale`, for the guards' own text
    data: dict = field(default_factory=dict)


def current_call(record) -> Call | None:
    """This thread's pipeline call on the erasure state `record`, None outside one: a guard acts only in pipeline
    calls, never on the denoiser calls of training, attacks or user code."""
    return getattr(record.calls, "call", None)


def text_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The `encoder_hidden_states` of a denoiser call (keyword, or the third positional argument)."""
    hidden = kwargs.get("encoder_hidden_states")
    return args[2] if hidden is None and len(args) > 2 else hidden


def with_text_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) of a denoiser call with `hidden` as its `encoder_hidden_states`, where the call passed them."""
    if "encoder_hidden_states" not in kwargs and len(args) > 2:
        return args[:2] + (hidden,) + args[3:], kwargs
    return args, {**kwargs, "encoder_hidden_states": hidden}


def extend_gates(record, rows: torch.Tensor) -> None:
    """A guard that grows the denoiser batch (SLD's safety branch) gives each new row the membrane gates of the
    row `rows[i]` it was copied from, so membranes still gate every sample by its own prompt."""
    gates = getattr(record.per_call, "gates", None)
    if gates is not None:
        record.per_call.gates = gates[rows.to(gates.device)]


_WARNED: weakref.WeakSet = weakref.WeakSet()


def outside_call(guard) -> None:
    """Log once per guard that a denoiser call outside a pipeline call (training, attacks, a pipeline built from
    this one's components without `enable_erasure`) ran without it."""
    if guard not in _WARNED:
        _WARNED.add(guard)
        logger.warning(
            "The %s guard acts only inside calls of a pipeline that diffusers-erase prepared; a denoiser call outside "
            "one ran without it. For a pipeline built from this one's components (from_pipe, Cls(**components)), "
            "call diffusers_erase.enable_erasure(new_pipe) first.", guard.guard_type)


@torch.no_grad()
def encode_text(pipe, text: str, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, tokens, dim) embeddings of `text` and (SDXL) its (1, dim) pooled embedding, as the pipeline's own
    `encode_prompt` makes them (with `options`: the call's `Call.encoding`), without recording them as a prompt of
    the call (guards encode their own text)."""
    encode_prompt = super(PromptRecorder, pipe).encode_prompt if isinstance(pipe, PromptRecorder) else getattr(
        pipe, "encode_prompt", None)
    if encode_prompt is None:
        raise ValueError(f"{type(pipe).__name__} has no `encode_prompt`, which guards use to encode their text.")
    device = getattr(pipe, "_execution_device", None) or denoiser(pipe).device
    output = encode_prompt(prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                           **options)
    pooled = output[2] if len(output) > 3 else None
    return output[0].detach(), None if pooled is None else pooled.detach()


def _count_steps(record):
    def hook(model, args, output):
        call = current_call(record)
        if call is not None:
            call.step += 1

    return hook


def _denoiser_pre_hook(record, attentions: list[nn.Module]):
    """Computes this call's per-sample gates and keeps them for this thread only (`per_call`): two threads
    denoising through one UNet each see their own. `attentions`: the attention modules holding membrane layers;
    once their projections are fused (`pipe.fuse_qkv_projections()` after loading), the hooked to_q/to_k/to_v
    no longer run, so the call is refused rather than run without the membrane."""
    def hook(model, args, kwargs):
        if any(runs_fused(m) for m in attentions):
            raise ValueError("The UNet's q/k/v projections were fused after a membrane was loaded, which bypasses "
                             "it; call `pipe.unfuse_qkv_projections()` (or unload the erasure).")
        hidden = text_input(args, kwargs)
        runtime, call = record.runtime, record.per_call
        if hidden is None or runtime is None or not runtime.gates:
            call.gates = None
            return None
        gates = compute_gates(runtime.gates, hidden, getattr(call, "recorded", []),
                              record.unconditional_gate == "prompt", getattr(call, "last_gates", None))
        call.last_gates = gates
        call.gates = gates if bool(gates.any()) else None
        return None

    return hook


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


def _module_hook(record, down: torch.Tensor, up: torch.Tensor, index: torch.Tensor):
    def hook(module, args, output):
        gates = getattr(record.per_call, "gates", None)
        if gates is None or record.runtime is None:
            return output
        x = args[0]
        scale = gates[:, index]
        if scale.shape[0] != x.shape[0]:
            # A module that sees another batch layout than the denoiser input: the strongest gate of the batch,
            # so an erasure never weakens.
            scale = scale.amax(dim=0, keepdim=True).expand(x.shape[0], -1)
        if torch.is_grad_enabled():
            return output + low_rank_delta(module, x, down, up, scale.to(x.dtype))
        return low_rank_delta(module, x, down, up, scale.to(x.dtype), add_to=output)  # in place where it can

    return hook


def detach(pipe) -> None:
    """Remove every runtime hook (membranes and guards never touched a weight)."""
    record = state(pipe)
    for handle in record.hooks:
        handle.remove()
    record.hooks.clear()
    record.per_call = threading.local()
    record.runtime = None


def refresh(pipe) -> None:
    """(Re)attach the hooks of every erasure on `pipe` that runs beside the weights (membranes with their current
    weights and gating, guards). Everything is built first; the old hooks are swapped out only when that
    succeeded, and a guard that fails to attach leaves no hook behind."""
    record = state(pipe)
    beside = [e for e in record.erasures if e.edit.runs_beside_weights]
    # The one place that tells the kinds apart: membranes share gate and factor hooks, guards bring their own.
    membranes = [e for e in beside if isinstance(e.edit, Membrane)]
    guards = [e for e in beside if isinstance(e.edit, Guard)]
    if not beside:
        detach(pipe)
        return
    gates = [_build_gate(pipe, e) for e in membranes]
    per_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for m, erasure in enumerate(membranes):
        for name, delta in erasure.edit.deltas.items():
            per_module.setdefault(module_of(name), []).append((m, delta.up, delta.down))
    hooks = []
    for name, parts in per_module.items():
        module = get_module(pipe, name)
        weight = module.weight
        down = torch.cat([d for _, _, d in parts]).to(weight.device, weight.dtype)
        up = torch.cat([u for _, u, _ in parts], dim=1).to(weight.device, weight.dtype)
        index = torch.tensor([m for m, _, d in parts for _ in range(d.shape[0])], device=weight.device)
        hooks.append((module, _module_hook(record, down, up, index)))
    guard_handles, family = [], family_of(pipe).name
    try:
        for erasure in guards:
            guard = erasure.edit
            if family not in guard.families:
                raise ValueError(f"The {guard.guard_type} guard runs on the {', '.join(guard.families)} families, not "
                                 f"{family!r}.")
            guard_handles.extend(guard.attach(pipe))
    except BaseException:
        for handle in guard_handles:
            handle.remove()
        raise
    detach(pipe)
    record.runtime = _Runtime(gates)
    record.hooks.extend(guard_handles)
    model = denoiser(pipe)
    if guards:  # after the guards' own hooks, so they see the step they act on
        record.hooks.append(model.register_forward_hook(_count_steps(record)))
    if membranes:
        parents = {name.rpartition(".")[0] for name in per_module}
        attentions = [m for m in (get_module(pipe, n) for n in parents) if hasattr(m, "fused_projections")]
        # First of the denoiser's pre-hooks: the gates come from the pipeline's own rows, before a guard swaps
        # (SAFREE) or adds (SLD) any.
        record.hooks.append(model.register_forward_pre_hook(_denoiser_pre_hook(record, attentions),
                                                            with_kwargs=True, prepend=True))
        for module, hook in hooks:
            record.hooks.append(module.register_forward_hook(hook))
    if hasattr(pipe, "encode_prompt"):
        with_mixin(pipe, PromptRecorder)


def prompt_gates(pipe, prompts: list[str]) -> torch.Tensor:
    """(prompts, membranes) strengths w·γ that the attached membranes would get for these prompts."""
    runtime = state(pipe).runtime
    if runtime is None or not runtime.gates:
        return torch.zeros(len(prompts), 0)
    # T5 (FLUX/SD3): score the prompts at the length the membranes were made for, as a call with it runs them
    lengths = {e.options.get("max_sequence_length") for e in state(pipe).erasures if isinstance(e.edit, Membrane)}
    with max_sequence_length(next(iter(lengths)) if len(lengths) == 1 else None):
        hidden = encode(pipe, list(prompts), full_length=True)
    tokens = token_sets(pipe, list(prompts))
    recorded = [(row, _overlaps(runtime.gates, t), False) for row, t in zip(hidden, tokens)]
    return compute_gates(runtime.gates, hidden, recorded).cpu()
