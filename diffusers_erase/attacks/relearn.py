"""Relearning: a few fine-tuning steps on images of the concept bring it back ("Erased or Dormant?", arXiv
2505.16174; RESTOR; UnUnlearning). The cheapest strong attack: it needs only weights and a handful of images.

A rank-r LoRA on the cross-attention (the `esd-x` group of the training engine, whose deltas are hooked beside the
weights, so the attacked pipeline's weights are never written) is fitted to the reference model's images of the
concept prompts with the plain denoising loss

    min_{ΔW}  E_{x_0, t, ε} ‖ ε − ε_{θ' + ΔW}( √ᾱ_t x_0 + √(1 − ᾱ_t) ε,  t,  E'(prompt) ) ‖²

and every attacked case is generated after each checkpoint's number of steps: the recovery curve (concept rate vs
steps). ASR is the rate after the last checkpoint. The hooks go when the attack ends.
"""

from __future__ import annotations

import torch

from ..families import train_group
from ..methods._training import Trainable, denoising_loss, training
from ..text import encode
from ._core import Attack


def _relearn_all(context, rng, *, images_per_prompt, steps, lr, lora_rank, checkpoints):
    """Train once; generate every attacked case at every checkpoint. {(prompt, seed): (scores, images)}."""
    pipe = context.pipe
    unet = pipe.unet
    prompts = context.concept_prompts
    with torch.no_grad():
        conditions = dict(zip(prompts, encode(pipe, prompts, full_length=True).to(unet.device, unet.dtype)))
    data = [(context.reference_latents(p, s), p) for p in prompts for s in range(images_per_prompt)]
    trainable = Trainable(train_group(pipe, "esd-x"), lora_rank, rng)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=lr)
    cases = [c for c in context.cases if c.no_attack < context.detector.threshold]
    out = {(c.prompt, c.seed): ([], []) for c in cases}
    with training(pipe, trainable, False):
        for step in range(1, steps + 1):
            x0, prompt = data[int(torch.randint(len(data), (), generator=rng))]
            t = int(torch.randint(pipe.scheduler.config.num_train_timesteps, (), generator=rng))
            x0 = x0.to(unet.device, unet.dtype)
            noise = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
            loss = denoising_loss(unet, pipe.scheduler, x0, t, conditions[prompt][None], noise)
            grads = torch.autograd.grad(loss, trainable.parameters())
            for parameter, grad in zip(trainable.parameters(), grads):
                parameter.grad = grad
            optimizer.step()
            if step in checkpoints:
                images = context.images(prompts=[c.prompt for c in cases], seeds=[c.seed for c in cases])
                for case, image, score in zip(cases, images, context.scores(images)):
                    out[(case.prompt, case.seed)][0].append(float(score))
                    out[(case.prompt, case.seed)][1].append(image)
    return out


def run(context, case, rng, *, images_per_prompt, steps, lr=1e-4, lora_rank=4, checkpoints=None):
    checkpoints = tuple(sorted(set(checkpoints or (steps // 4, steps // 2, steps)) - {0}))
    if not checkpoints or checkpoints[-1] != steps:
        raise ValueError(f"relearn checkpoints must be step counts ≤ steps and include steps={steps}.")
    key = ("relearn", images_per_prompt, steps, lr, lora_rank, checkpoints)
    if key not in context.cache:
        context.cache[key] = _relearn_all(  # trained from the run's seed: the same LoRA on every shard
            context, torch.Generator().manual_seed(context.seed), images_per_prompt=images_per_prompt, steps=steps,
            lr=lr, lora_rank=lora_rank, checkpoints=checkpoints)
    scores, images = context.cache[key][(case.prompt, case.seed)]
    case.curve = dict(zip(checkpoints, scores))
    return scores[-1], images[-1], f"rank-{lora_rank} LoRA, {steps} steps", len(checkpoints)


ATTACK = Attack(
    name="relearn",
    run=run,
    budgets={"quick": {"images_per_prompt": 2, "steps": 200, "lr": 1e-3},
             "paper": {"images_per_prompt": 4, "steps": 1000, "lr": 1e-4}},
    needs_reference=True,
    paper="Erased or Dormant? Rethinking Concept Erasure Through Reversibility (arXiv 2505.16174)",
)
