"""Measure concept erasure on a shapes-world pipeline with the world's classifier.

    from diffusers_erase import shapes
    pipe = shapes.load_pipeline()
    before = shapes.evaluate(pipe)                      # the unedited model: every concept's accuracy
    ... erase "circle" from pipe ...
    after = shapes.evaluate(pipe, erased=["circle"], baseline=before, grid_path="circle.png")
    print(after.to_markdown())

Every prompt is generated at paired seeds: image k of every prompt uses `seed + k`, so a before
and an after run differ only by the edit, and differences are not sampling noise.

For each erased concept the report gives
  efficacy     rate at which its direct prompts ("a red circle") still show it; lower is better
  residue      the same rate on synonym prompts ("a red disk"); lower is better
  specificity  mean accuracy over every other concept's direct prompts (each prompt judged on the
               attribute that concept belongs to), and its ratio to the baseline's.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import world
from .classifier import DEFAULT_THRESHOLD, classify, load_classifier

# Generation settings, tuned on the shipped model for classifier accuracy (docs/shapes.md).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
DEFAULT_SAMPLER = "DPMSolverMultistepScheduler"
DEFAULT_SEED = 0
DEFAULT_IMAGES_PER_PROMPT = 10
# Prompts per pipeline call: bigger batches are faster on a CPU, and the grouping is fixed, so
# the same call always gives the same images.
PROMPTS_PER_BATCH = 6


@dataclass
class ConceptScore:
    """How often images show `concept` on its direct and synonym prompts, and how often "none"."""

    concept: str
    attribute: str
    direct: float
    synonym: float
    direct_none: float
    synonym_none: float
    # Accuracy on the other attributes these prompts ask for (e.g. the colour in "a red circle").
    direct_other_attributes: float
    # Rate on `world.held_out_prompts` (colour, background, style and framing together), when measured.
    held_out: float = None


@dataclass
class ErasureScore:
    concept: str
    efficacy: float
    residue: float
    specificity: float
    efficacy_before: float = None
    residue_before: float = None
    specificity_before: float = None
    specificity_ratio: float = None
    # The same over the other concepts' held-out prompts (`evaluate(..., held_out=True)`), and the lowest
    # per-concept ratio to the baseline: the neighbour an erasure damaged most.
    held_out_specificity: float = None
    held_out_specificity_before: float = None
    held_out_worst_ratio: float = None
    held_out_worst_concept: str = None


@dataclass
class EvaluationResult:
    scores: dict  # concept -> ConceptScore
    erased: list = field(default_factory=list)  # ErasureScore per erased concept
    settings: dict = field(default_factory=dict)
    grid_path: str = None
    # prompt text -> uint8 array (n, 32, 32, 3); kept for image grids, never serialised.
    images: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "erased": [asdict(e) for e in self.erased],
                "scores": {c: asdict(s) for c, s in self.scores.items()}, "grid_path": self.grid_path}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        lines = []
        if self.erased:
            lines += ["| erased | efficacy ↓ (before → after) | residue ↓ (before → after) | "
                      "specificity (before → after) | specificity ratio |", "|---|---|---|---|---|"]
            for e in self.erased:
                ratio = "" if e.specificity_ratio is None else f"{e.specificity_ratio:.2f}"
                lines.append(f"| {e.concept} | {_arrow(e.efficacy_before, e.efficacy)} | "
                             f"{_arrow(e.residue_before, e.residue)} | "
                             f"{_arrow(e.specificity_before, e.specificity)} | {ratio} |")
            lines.append("")
        held = any(s.held_out is not None for s in self.scores.values())
        if held and self.erased:
            lines += ["| erased | held-out specificity (before → after) | worst neighbour (ratio) |", "|---|---|---|"]
            for e in self.erased:
                lines.append(f"| {e.concept} | {_arrow(e.held_out_specificity_before, e.held_out_specificity)} | "
                             f"{e.held_out_worst_concept} ({e.held_out_worst_ratio:.2f}) |"
                             if e.held_out_worst_ratio is not None else
                             f"| {e.concept} | {_arrow(None, e.held_out_specificity)} | |")
            lines.append("")
        lines += ["| concept | attribute | direct | synonym | none (direct) | other asked attributes (direct) |"
                  + (" held-out |" if held else ""), "|---|---|---|---|---|---|" + ("---|" if held else "")]
        for s in self.scores.values():
            lines.append(f"| {s.concept} | {s.attribute} | {s.direct:.0%} | {s.synonym:.0%} | {s.direct_none:.0%} | "
                         f"{s.direct_other_attributes:.0%} |" + (f" {s.held_out:.0%} |" if held else ""))
        return "\n".join(lines)


def _arrow(before, after) -> str:
    return f"{after:.0%}" if before is None else f"{before:.0%} → {after:.0%}"


@torch.no_grad()
def generate(pipe, prompts, images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT, seed: int = DEFAULT_SEED,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress: bool = True) -> dict:
    """{prompt: uint8 array (n, h, w, 3)}; image k of every prompt is generated from seed + k."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    original_scheduler = pipe.scheduler
    flux = hasattr(pipe, "transformer") and getattr(pipe, "unet", None) is None
    # The sampler is part of the protocol, so use it whatever scheduler the caller's pipe has.
    sampler = FlowMatchEulerDiscreteScheduler if flux else DPMSolverMultistepScheduler
    pipe.scheduler = sampler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    try:
        batches = [prompts[i : i + PROMPTS_PER_BATCH] for i in range(0, len(prompts), PROMPTS_PER_BATCH)]
        for batch in tqdm(batches, desc="generate", disable=not progress):
            generators = [torch.Generator(device="cpu").manual_seed(seed + k)
                          for _ in batch for k in range(images_per_prompt)]
            # The FLUX-architecture model has no guidance embedding: true classifier-free guidance, T5 padded to
            # the length it was trained with.
            extra = dict(negative_prompt=[""] * len(batch), true_cfg_scale=guidance, height=world.IMAGE_SIZE,
                         width=world.IMAGE_SIZE, max_sequence_length=pipe.tokenizer_2.model_max_length) if flux else {}
            images = pipe(list(batch), num_images_per_prompt=images_per_prompt, num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, output_type="np", **extra).images
            images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
            for j, prompt in enumerate(batch):
                out[prompt] = images[j * images_per_prompt : (j + 1) * images_per_prompt]
    finally:
        pipe.scheduler = original_scheduler
    return out


def _rate(predictions, attribute, value) -> float:
    return float(np.mean([p[attribute] == value for p in predictions])) if predictions else float("nan")


def evaluate(pipe, erased=(), concepts=None, baseline: EvaluationResult = None, images_per_prompt: int = None,
             seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             classifier=None, threshold: float = DEFAULT_THRESHOLD, grid_path=None,
             progress: bool = True, held_out: bool = False) -> EvaluationResult:
    """Generate each concept's direct and synonym prompts and score them with the classifier.

    `concepts` limits which concepts are measured (default: all 19); erased concepts are always
    included. Pass `baseline` (a result from the unedited model, same settings) to get before
    numbers, specificity ratios and a before/after grid; `images_per_prompt` defaults to the
    baseline's, else DEFAULT_IMAGES_PER_PROMPT. `held_out=True` also measures every concept on
    `world.held_out_prompts` (forms no preserve list contains) and, per erased concept, the specificity there
    (the baseline must have been measured with `held_out=True` too).
    """
    erased = list(erased)
    for concept in erased:
        world.concept_attribute(concept)  # raises on an unknown concept
    if images_per_prompt is None:
        images_per_prompt = baseline.settings["images_per_prompt"] if baseline else DEFAULT_IMAGES_PER_PROMPT
    settings = {"images_per_prompt": images_per_prompt, "seed": seed, "steps": steps, "guidance": guidance,
                "sampler": DEFAULT_SAMPLER, "threshold": threshold}
    if baseline is not None and baseline.settings != settings:
        raise ValueError(f"baseline settings {baseline.settings} differ from these {settings}; "
                         "before/after comparisons need identical settings")
    measured = list(concepts) if concepts is not None else list(world.CONCEPTS)
    measured += [c for c in erased if c not in measured]

    # 1. Generate every prompt once (prompts shared between concepts are generated once).
    prompt_sets = {c: (world.concept_prompts(c), world.concept_prompts(c, synonyms=True)) for c in measured}
    held_sets = {c: world.held_out_prompts(c) for c in measured} if held_out else {}
    texts = list(dict.fromkeys([p.text for direct, synonym in prompt_sets.values() for p in direct + synonym]
                               + [p.text for prompts in held_sets.values() for p in prompts]))
    images = generate(pipe, texts, images_per_prompt, seed, steps, guidance, progress)

    # 2. Classify every image.
    classifier = classifier if classifier is not None else load_classifier()
    predictions = {text: classify(classifier, batch, threshold) for text, batch in images.items()}

    # 3. Score each concept on the attribute it belongs to.
    scores = {}
    for concept, (direct, synonym) in prompt_sets.items():
        attribute = world.concept_attribute(concept)
        direct_preds = [p for prompt in direct for p in predictions[prompt.text]]
        synonym_preds = [p for prompt in synonym for p in predictions[prompt.text]]
        others = [p[a] == v for prompt in direct for p in predictions[prompt.text]
                  for a, v in prompt.asks.items() if a != attribute]
        scores[concept] = ConceptScore(
            concept, attribute, direct=_rate(direct_preds, attribute, concept),
            synonym=_rate(synonym_preds, attribute, concept), direct_none=_rate(direct_preds, attribute, "none"),
            synonym_none=_rate(synonym_preds, attribute, "none"),
            direct_other_attributes=float(np.mean(others)) if others else float("nan"),
            held_out=_rate([p for prompt in held_sets[concept] for p in predictions[prompt.text]], attribute, concept)
            if held_out else None)

    # 4. Per erased concept: efficacy, residue, specificity over every other measured concept.
    erasures = []
    for concept in erased:
        others = [c for c in measured if c not in erased]
        specificity = float(np.mean([scores[c].direct for c in others])) if others else float("nan")
        score = ErasureScore(concept, efficacy=scores[concept].direct, residue=scores[concept].synonym,
                             specificity=specificity)
        if baseline is not None:
            missing = [c for c in [concept] + others if c not in baseline.scores]
            if missing:
                raise ValueError(f"baseline has no scores for {missing}; evaluate the baseline on the same concepts")
            score.efficacy_before = baseline.scores[concept].direct
            score.residue_before = baseline.scores[concept].synonym
            score.specificity_before = float(np.mean([baseline.scores[c].direct for c in others]))
            before = score.specificity_before
            score.specificity_ratio = score.specificity / before if before else None
        if held_out and others:
            score.held_out_specificity = float(np.mean([scores[c].held_out for c in others]))
            if baseline is not None:
                if any(baseline.scores[c].held_out is None for c in others):
                    raise ValueError("evaluate(held_out=True) needs a baseline measured with held_out=True")
                score.held_out_specificity_before = float(np.mean([baseline.scores[c].held_out for c in others]))
                ratios = {c: scores[c].held_out / baseline.scores[c].held_out for c in others
                          if baseline.scores[c].held_out}
                if ratios:
                    score.held_out_worst_concept = min(ratios, key=ratios.get)
                    score.held_out_worst_ratio = ratios[score.held_out_worst_concept]
        erasures.append(score)

    result = EvaluationResult(scores=scores, erased=erasures, settings=settings, images=images)
    if grid_path is not None and erased:
        save_grid(result, baseline, grid_path)
        result.grid_path = str(grid_path)
    return result


def save_grid(result: EvaluationResult, baseline: EvaluationResult, path, images_per_row: int = 4,
              scale: int = 2) -> Image.Image:
    """A PNG with one row per prompt of each erased concept (direct, then synonyms) and one
    neighbouring concept's prompts: the prompt, then `before` images, then `after` images."""
    rows = []
    for concept in [e.concept for e in result.erased]:
        prompts = world.concept_prompts(concept)[:3] + world.concept_prompts(concept, synonyms=True)[:3]
        rows += [p.text for p in prompts]
        attribute = world.concept_attribute(concept)
        neighbour = next(c for c in world.ATTRIBUTES[attribute] if c not in [e.concept for e in result.erased])
        rows += [p.text for p in world.concept_prompts(neighbour)[:2]]
    rows = list(dict.fromkeys(rows))
    images_per_row = min(images_per_row, result.settings["images_per_prompt"])
    tile = world.IMAGE_SIZE * scale
    label_width, gap = 230, 12
    panels = [baseline, result] if baseline is not None else [result]
    width = label_width + len(panels) * (images_per_row * tile + gap)
    grid = Image.new("RGB", (width, 18 + len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(["before", "after"] if baseline is not None else ["after"]):
        draw.text((label_width + j * (images_per_row * tile + gap), 3), title, fill="black")
    for i, prompt in enumerate(rows):
        y = 18 + i * tile
        draw.text((4, y + tile // 2 - 6), prompt, fill="black")
        for j, panel in enumerate(panels):
            for k, image in enumerate(panel.images.get(prompt, [])[:images_per_row]):
                x = label_width + j * (images_per_row * tile + gap) + k * tile
                grid.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
