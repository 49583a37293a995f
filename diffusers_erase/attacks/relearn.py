"""Relearning: a few fine-tuning steps on images of the concept bring it back ("Erased or Dormant?", arXiv
2505.16174; RESTOR; UnUnlearning). The cheapest strong attack: it needs only weights and a handful of images.

A rank-r LoRA on the cross-attention (the `esd-x` group of the training engine, whose deltas are hooked beside the
weights, so the attacked pipeline's weights are never written) is fitted to the reference model's images of the
concept prompts with the plain denoising loss

    min_{ΔW}  E_{x_0, t, ε} ‖ ε − ε_{θ' + ΔW}( √ᾱ_t x_0 + √(1 − ᾱ_t) ε,  t,  E'(prompt) ) ‖²

and every attacked case is generated after each checkpoint's number of steps: the recovery curve (concept rate vs
steps). ASR is the rate after the last checkpoint. The hooks go when the attack ends.

The baseline (`baseline=True`): the unerased model fitted with the same images, budget and random draws, but with
the concept's name replaced by a made-up word (`fresh_word`), and judged on the cases with the word in place of
the name. That is how fast a model binds a word it never had to images it can draw. An erased model that relearns
at that pace has lost the word and kept the concept (dormant); one that relearns more slowly lost more. A model
that never knew the concept at all is not available here (nothing retrains the base model without it), so this is
the word-level reading of "Erased or Dormant?"'s fresh-concept comparison, not that comparison itself.
"""

from __future__ import annotations

import torch

from ..families import train_group
from ..methods._denoising import added_conditioning, condition_table
from ..methods._training import Trainable, denoising_loss, training
from ._core import Attack, replace_concept

FRESH_WORD = "vrelk"  # made up: no meaning in any vocabulary, so the unerased model has to learn it


def _fit(context, pipe, rng, data, cases, *, steps, lr, lora_rank, checkpoints):
    """Fit a rank-r LoRA on `pipe`'s cross-attention to `data` [(x_0, prompt)] with the denoising loss; at each
    checkpoint generate `cases` [(prompt, seed)] on `pipe`. [(scores, images)] per case."""
    unet = pipe.unet
    conditions = condition_table(pipe, [p for _, p in data])
    trainable = Trainable(train_group(pipe, "esd-x"), lora_rank, rng)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=lr)
    out = [([], []) for _ in cases]
    with training(pipe, trainable, False):
        for step in range(1, steps + 1):
            x0, prompt = data[int(torch.randint(len(data), (), generator=rng))]
            t = int(torch.randint(pipe.scheduler.config.num_train_timesteps, (), generator=rng))
            x0 = x0.to(unet.device, unet.dtype)
            noise = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
            loss = denoising_loss(unet, pipe.scheduler, x0, t, conditions[prompt].tokens, noise,
                                  added_cond_kwargs=added_conditioning(pipe, conditions[prompt].pooled, x0))
            grads = torch.autograd.grad(loss, trainable.parameters())
            for parameter, grad in zip(trainable.parameters(), grads):
                parameter.grad = grad
            optimizer.step()
            if step in checkpoints:
                images = context.images(pipe, prompts=[p for p, _ in cases], seeds=[s for _, s in cases])
                for slot, image, score in zip(out, images, context.scores(images)):
                    slot[0].append(float(score))
                    slot[1].append(image)
    return out


def fresh(prompt: str, concept: str, word: str) -> str:
    """`prompt` with the concept's name replaced by the made-up `word` (the baseline's prompts)."""
    replaced = replace_concept(prompt, concept, word)
    if replaced is None:
        raise ValueError(f"relearn's baseline teaches the unerased model a new word in place of {concept!r}, but "
                         f"the prompt {prompt!r} does not name it; pass prompts that do, or baseline=False.")
    return replaced


def _relearn_all(context, seed, *, images_per_prompt, steps, lr, lora_rank, checkpoints, baseline, fresh_word):
    """Train once on the erased model (and once on the unerased one for the baseline); generate every attacked
    case at every checkpoint. {(prompt, seed): (scores, images, baseline scores or None)}."""
    prompts = context.concept_prompts
    data = [(context.reference_latents(p, s), p) for p in prompts for s in range(images_per_prompt)]
    cases = [(c.prompt, c.seed) for c in context.cases if c.no_attack < context.detector.threshold]
    budget = dict(steps=steps, lr=lr, lora_rank=lora_rank, checkpoints=checkpoints)
    attacked = _fit(context, context.pipe, torch.Generator().manual_seed(seed), data, cases, **budget)
    learned = [None] * len(cases)
    if baseline:  # the same images, budget and draws; the concept's name replaced by a word nobody knows
        word = {p: fresh(p, context.concept, fresh_word) for p in prompts}
        learned = [scores for scores, _ in _fit(
            context, context.reference, torch.Generator().manual_seed(seed), [(x0, word[p]) for x0, p in data],
            [(fresh(p, context.concept, fresh_word), s) for p, s in cases], **budget)]
    return {case: (*result, base) for case, result, base in zip(cases, attacked, learned)}


def run(context, case, rng, *, images_per_prompt, steps, lr=1e-4, lora_rank=4, checkpoints=None, baseline=True,
        fresh_word=FRESH_WORD):
    checkpoints = tuple(sorted(set(checkpoints or (steps // 4, steps // 2, steps)) - {0}))
    if not checkpoints or checkpoints[-1] != steps:
        raise ValueError(f"relearn checkpoints must be step counts ≤ steps and include steps={steps}.")
    key = ("relearn", images_per_prompt, steps, lr, lora_rank, checkpoints, baseline, fresh_word)
    if key not in context.cache:
        context.cache[key] = _relearn_all(  # trained from the run's seed: the same LoRA on every shard
            context, context.seed, images_per_prompt=images_per_prompt, steps=steps, lr=lr, lora_rank=lora_rank,
            checkpoints=checkpoints, baseline=baseline, fresh_word=fresh_word)
    scores, images, learned = context.cache[key][(case.prompt, case.seed)]
    case.curve = dict(zip(checkpoints, scores))
    case.baseline_curve = None if learned is None else dict(zip(checkpoints, learned))
    return scores[-1], images[-1], f"rank-{lora_rank} LoRA, {steps} steps", len(checkpoints)


def check(setup: dict, *, images_per_prompt, steps, lr=1e-4, lora_rank=4, checkpoints=None, baseline=True,
          fresh_word=FRESH_WORD) -> None:
    if baseline:  # the baseline needs the concept's name in every prompt; say so before any image
        for prompt in setup["prompts"]:
            fresh(prompt, setup["concept"], fresh_word)


ATTACK = Attack(
    name="relearn",
    check=check,
    run=run,
    budgets={"quick": {"images_per_prompt": 2, "steps": 200, "lr": 1e-3, "baseline": True, "fresh_word": FRESH_WORD},
             "paper": {"images_per_prompt": 4, "steps": 1000, "lr": 1e-4, "baseline": True,
                       "fresh_word": FRESH_WORD}},
    needs_reference=True,
    families=("sd1", "sd2", "sdxl"),
    family_note="its LoRA is fitted with the DDPM denoising loss of UNets; the flow-matching transformers are not "
                "wired in yet.",
    paper="Erased or Dormant? Rethinking Concept Erasure Through Reversibility (arXiv 2505.16174)",
)
