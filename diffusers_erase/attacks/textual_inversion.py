"""Textual inversion against an erasure ("Circumventing Concept Erasure Methods for Text-to-Image Generative
Models", Pham et al., ICLR 2024; "Concept Inversion").

A new word v* (one token embedding) is learned on images of the concept *through the erased model*, its weights
and erasure unchanged:

    min_{v*}  E_{x_0, t, ε} ‖ ε − ε_θ'( √ᾱ_t x_0 + √(1 − ᾱ_t) ε,  t,  E'(template(v*)) ) ‖²

with textual inversion's object templates ("a photo of a {}", ...), Adam, and x_0 the reference model's images of
the concept prompts (or the user's). Each case's prompt is then generated with the concept's word replaced by v*
(fed as `prompt_embeds`: v* is not in the tokenizer). On SDXL there is one v* per CLIP encoder, as SDXL's
textual inversion trains them, and the loss reads the pooled vector and time ids. The paper's setting is the
diffusers textual-inversion example's (lr 5e-3 for its batch, a few thousand steps); the quick budget trains a few
hundred steps.
"""

from __future__ import annotations

import torch

from ..adversarial import token_embeddings_replaced
from ..families import text_pairs
from ..methods._denoising import added_conditioning
from ..methods._training import denoising_loss
from ..text import encoder_outputs
from ._core import Attack, Tries

TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
             "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}", "a good photo of a {}")
PLACEHOLDER = "x"  # a one-token word that marks v*'s place; its embedding is replaced, never read


def _ids_and_slot(tokenizer, prompt: str) -> tuple[torch.Tensor, slice]:
    """Token ids of `prompt` (which holds PLACEHOLDER once, as its own word) and the slot of that word."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids[0]
    marker = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids[0]
    where = (ids == marker).nonzero().flatten()
    if len(where) == 0:
        raise ValueError(f"The prompt {prompt!r} is too long to place the learned word in it.")
    return ids, slice(int(where[-1]), int(where[-1]) + 1)


def conditions(pipe, prompt: str, vectors: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled vector or None) of `prompt` (holding PLACEHOLDER) with v* in the placeholder's slot:
    one v* per text encoder (SDXL: both CLIPs, states concatenated, the pooled vector the second's)."""
    states, pooled = [], None
    for (tokenizer, encoder, row), vector in zip(text_pairs(pipe), vectors):
        ids, slot = _ids_and_slot(tokenizer, prompt)
        with token_embeddings_replaced(encoder, slot, vector[None]):
            hidden, output = encoder_outputs(encoder, row, ids[None].to(encoder.device))
        states.append(hidden)
        pooled = output if output is not None else pooled
    return torch.cat(states, dim=-1), pooled


def learn(context, *, images_per_prompt: int, steps: int, lr: float, rng) -> list:
    """v* (one per text encoder), learned on the reference model's images of the concept (at seeds
    0..images_per_prompt-1)."""
    pipe = context.pipe
    targets = [context.reference_latents(p, s) for p in context.concept_prompts for s in range(images_per_prompt)]
    vectors = []
    for tokenizer, encoder, _ in text_pairs(pipe):  # each starts at the concept's word in its own table
        start = tokenizer(context.concept, add_special_tokens=False).input_ids[:1]
        vectors.append(torch.nn.Parameter(encoder.get_input_embeddings().weight.detach()[start[0]].float().clone()))
    optimizer = torch.optim.Adam(vectors, lr=lr)
    for _ in range(steps):
        x0 = targets[int(torch.randint(len(targets), (), generator=rng))].to(pipe.unet.device, pipe.unet.dtype)
        template = TEMPLATES[int(torch.randint(len(TEMPLATES), (), generator=rng))]
        t = int(torch.randint(pipe.scheduler.config.num_train_timesteps, (), generator=rng))
        noise = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
        states, pooled = conditions(pipe, template.format(PLACEHOLDER), vectors)
        loss = denoising_loss(pipe.unet, pipe.scheduler, x0, t, states, noise,
                              added_cond_kwargs=added_conditioning(pipe, pooled, x0))
        for vector, grad in zip(vectors, torch.autograd.grad(loss, vectors)):
            vector.grad = grad
        optimizer.step()
    return [v.detach() for v in vectors]


def attacked_prompt(prompt: str, concept: str) -> str:
    """The case's prompt with the concept's words replaced by v*'s placeholder (or v* put in front)."""
    if concept in prompt:
        return prompt.replace(concept, PLACEHOLDER)
    return f"{PLACEHOLDER} {prompt}"


def run(context, case, rng, *, images_per_prompt, steps, lr=5e-3):
    key = ("textual_inversion", images_per_prompt, steps, lr)
    if key not in context.cache:
        context.cache[key] = learn(context, images_per_prompt=images_per_prompt, steps=steps, lr=lr,
                                   rng=torch.Generator().manual_seed(context.seed))  # the same word on every shard
    vectors = context.cache[key]
    prompt = attacked_prompt(case.prompt, context.concept)
    with torch.no_grad():
        embeds, pooled = conditions(context.pipe, prompt, vectors)
    dtype = context.pipe.unet.dtype
    tries = Tries(context, case)
    tries.judge(f"{prompt.replace(PLACEHOLDER, '<v*>')} (‖v*‖ = {float(vectors[0].norm()):.2f})",
                prompt_embeds=embeds.to(dtype), pooled_prompt_embeds=None if pooled is None else pooled.to(dtype))
    return tries.result()


ATTACK = Attack(
    name="textual_inversion",
    run=run,
    budgets={"quick": {"images_per_prompt": 2, "steps": 300}, "paper": {"images_per_prompt": 4, "steps": 3000}},
    needs_reference=True,
    families=("sd1", "sd2", "sdxl"),
    family_note="it is trained with the DDPM loss of UNets and CLIP tokenizers (SD3 and FLUX: flow matching, T5).",
    paper="Circumventing Concept Erasure Methods for Text-to-Image Generative Models (ICLR 2024)",
)
