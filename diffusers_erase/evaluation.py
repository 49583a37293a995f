"""Evaluate an erasure on any pipeline with any detector: is the concept gone, do its paraphrases still bring it,
what else was damaged.

    from diffusers_erase import detectors, evaluate
    result = evaluate(pipe, "nudity", detectors.nudenet(), prompts=nude_prompts, synonyms=paraphrases,
                      others={"person": (person_prompts, person_detector)}, reference=base_pipe)
    print(result.to_markdown())

Every prompt is generated at the same seeds by the erased pipeline and, with `reference=`, by the unerased one, so
the two differ only by the erasure. Rates are the share of images the detector flags (score ≥ its threshold):

    efficacy     the concept's rate on its own prompts (lower is better)
    residue      its rate on the synonym/paraphrase prompts (lower is better)
    specificity  the mean over the other concepts of each one's rate on its prompts, judged by its own detector,
                 and its ratio to the reference's (1.0: nothing else damaged)

`shapes_setup(concept)` is the shapes world's configuration of this evaluator (its prompts, synonyms, the other
values of the concept's attribute as neighbours, and the classifier's heads as detectors): `evaluate(pipe,
**shapes_setup("circle"))`. `shapes.evaluate` stays the world's own report (grids, held-out prompts, "none"
rates), whose numbers the docs quote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import detectors
from .attacks import DEFAULT_PROMPTS
from .attacks._core import Context, Generation
from .detectors import Detector
from .families import family_of
from .shapes import world
from .shapes.evaluate import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS


@dataclass
class GroupRate:
    """How often one group of prompts shows what its detector looks for, after and (with a reference) before."""

    name: str
    prompts: list
    rate: float
    rate_before: float | None = None


@dataclass
class Evaluation:
    concept: str
    efficacy: GroupRate
    residue: GroupRate | None
    others: dict  # name -> GroupRate
    settings: dict = field(default_factory=dict)

    @property
    def specificity(self) -> float | None:
        return float(np.mean([g.rate for g in self.others.values()])) if self.others else None

    @property
    def specificity_before(self) -> float | None:
        if not self.others or any(g.rate_before is None for g in self.others.values()):
            return None
        return float(np.mean([g.rate_before for g in self.others.values()]))

    @property
    def specificity_ratio(self) -> float | None:
        before = self.specificity_before
        return None if not before else self.specificity / before

    def to_dict(self) -> dict:
        return {"concept": self.concept, "efficacy": asdict(self.efficacy),
                "residue": None if self.residue is None else asdict(self.residue),
                "others": {k: asdict(g) for k, g in self.others.items()}, "specificity": self.specificity,
                "specificity_before": self.specificity_before, "specificity_ratio": self.specificity_ratio,
                "settings": self.settings}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        def cell(group):
            return "–" if group is None else (f"{group.rate:.0%}" if group.rate_before is None
                                              else f"{group.rate_before:.0%} → {group.rate:.0%}")
        ratio = "–" if self.specificity_ratio is None else f"{self.specificity_ratio:.2f}"
        specificity = "–" if self.specificity is None else (
            f"{self.specificity:.0%}" if self.specificity_before is None
            else f"{self.specificity_before:.0%} → {self.specificity:.0%}")
        lines = ["| erased | efficacy ↓ | residue ↓ | specificity | specificity ratio |", "|---|---|---|---|---|",
                 f"| {self.concept} | {cell(self.efficacy)} | {cell(self.residue)} | {specificity} | {ratio} |"]
        if self.others:
            lines += ["", "| other concept | rate |", "|---|---|"]
            lines += [f"| {name} | {cell(group)} |" for name, group in self.others.items()]
        return "\n".join(lines)


def evaluate(pipe, concept: str, detector: Detector, *, prompts=None, synonyms=(), others: dict | None = None,
             reference=None, seeds=(0, 1), generation: Generation | None = None, batch_size: int = 4,
             progress: bool = True) -> Evaluation:
    """Measure `pipe` (erased) on `concept`: efficacy, residue and specificity, beside the reference's.

    Args:
        detector: judges the concept's images (`detectors`).
        prompts: prompts that show the concept (default: the concept in a few templates).
        synonyms: paraphrases that should show it too (the residue; none: not measured).
        others: {name: (prompts, detector)}: concepts that must survive, each judged by its own detector.
        reference: the same pipeline before erasure (the "before" rates).
        seeds: every prompt is generated once per seed.
        generation: sampling settings (`attacks.Generation`).
        batch_size: images per pipeline call (the grouping is fixed, so a rerun gives the same images).
    """
    if isinstance(prompts, str) or isinstance(synonyms, str):
        raise ValueError("`prompts` and `synonyms` are lists of prompts, not one string; wrap it: [\"...\"].")
    if reference is not None and family_of(reference).name != family_of(pipe).name:
        raise ValueError(f"The reference pipeline is {family_of(reference).name!r} but the evaluated one is "
                         f"{family_of(pipe).name!r}; the reference must be the same model before erasure.")
    prompts = list(prompts) if prompts else [t.format(concept) for t in DEFAULT_PROMPTS]
    groups = {"efficacy": (prompts, detector)}
    if synonyms:
        groups["residue"] = (list(synonyms), detector)
    for name, entry in (others or {}).items():
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], Detector)
                and entry[0] and not isinstance(entry[0], str)):
            raise ValueError(f"others[{name!r}] must be (a list of prompts, a Detector); got {entry!r}.")
        groups[f"other:{name}"] = (list(entry[0]), entry[1])
    seeds = [int(s) for s in seeds]
    if not seeds or batch_size < 1:
        raise ValueError("evaluate needs at least one seed and batch_size ≥ 1.")
    for _, judge in groups.values():
        judge(np.zeros((2, 16, 16, 3), np.uint8))  # a detector returning bad scores fails here, before any image
    context = Context(pipe, reference, detector, concept, generation or Generation(), progress)
    bar = tqdm(total=sum(len(p) for p, _ in groups.values()) * len(seeds) * (2 if reference is not None else 1),
               desc="evaluate", disable=not progress)
    rates = {}
    for key, (group, judge) in groups.items():
        after = _rate(context, pipe, group, seeds, judge, batch_size, bar)
        before = None if reference is None else _rate(context, reference, group, seeds, judge, batch_size, bar)
        rates[key] = GroupRate(key.removeprefix("other:"), group, after, before)
    bar.close()
    settings = {"seeds": seeds, "generation": asdict(context.generation), "detector": detector.name,
                "threshold": detector.threshold}
    return Evaluation(concept, rates["efficacy"], rates.get("residue"),
                      {g.name: g for k, g in rates.items() if k.startswith("other:")}, settings)


def _rate(context: Context, pipe, prompts: list, seeds: list, detector: Detector, batch_size: int, bar) -> float:
    jobs = [(p, s) for p in prompts for s in seeds]
    flags = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start: start + batch_size]
        images = context.images(pipe, prompts=[p for p, _ in chunk], seeds=[s for _, s in chunk])
        flags += list(detector(images) >= detector.threshold)
        bar.update(len(chunk))
    return float(np.mean(flags))


def shapes_setup(concept: str) -> dict:
    """`evaluate`'s arguments for a shapes-world concept: its direct and synonym prompts judged by the classifier's
    head for it, every other value of its attribute as a neighbour on its own direct prompts, and the world's
    sampling settings (docs/shapes.md)."""
    attribute = world.concept_attribute(concept)
    others = {o: (world.direct_prompts(o), detectors.shapes(o)) for o in world.ATTRIBUTES[attribute] if o != concept}
    generation = Generation(num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                            scheduler=DEFAULT_SAMPLER)
    return {"concept": concept, "detector": detectors.shapes(concept), "prompts": world.direct_prompts(concept),
            "synonyms": world.synonym_prompts(concept), "others": others, "generation": generation}
