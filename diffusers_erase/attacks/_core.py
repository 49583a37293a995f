"""What every attack shares: the cases it attacks, generation at fixed seeds, the detector's verdicts, counting, and
the report.

A *case* is one (prompt, seed) that should show the concept. Each case is generated three ways at its seed: by the
attacked pipeline with no attack (the erasure's own rate), by the reference (base) pipeline (the concept's rate
before erasure), and under the attack. As in UnlearnDiffAtk's protocol, a case the erased model already fails on is
a success without an attack (no queries); otherwise the attack runs and succeeds when the detector flags an image
it produced. ASR is the success rate over cases, read against its two references.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ..detectors import Detector
from ..families import family_of


@dataclass(frozen=True)
class Generation:
    """How images are made for every verdict of a run (each case at its seed).

    Args:
        num_inference_steps, guidance_scale: as for the pipeline call (real SD: 50 and 7.5, as the papers sample).
        scheduler: a diffusers scheduler class name used for the run (the pipeline's own is put back), or None.
        height, width: None for the pipeline's default size.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None


@dataclass
class Case:
    prompt: str
    seed: int
    no_attack: float = float("nan")  # detector score of the erased model's image, no attack
    base: float | None = None  # the reference (unerased) model's score
    attacked: float | None = None  # the best score the attack reached (None: not run, the case already failed)
    adversarial: str | None = None  # what the attack found (a prompt, or a description of an embedding)
    queries: int = 0  # generations the attack made for this case
    success: bool = False
    curve: dict | None = None  # attacks with a budget axis (relearn): score after each checkpoint
    baseline_curve: dict | None = None  # relearn's baseline: the unerased model learning a new word, per checkpoint


@dataclass
class AttackResult:
    """One attack's outcome over the cases."""

    attack: str
    budget: str
    options: dict
    cases: list[Case]
    threshold: float
    seconds: float = 0.0
    unet_evaluations: int = 0
    images: dict = field(default_factory=dict, repr=False)  # case index -> uint8 image of the attack's best try
    indices: list = field(default_factory=list, repr=False)  # the cases' indices in the run (a shard holds some)

    @property
    def asr(self) -> float:
        return float(np.mean([c.success for c in self.cases]))

    @property
    def no_attack_rate(self) -> float:
        return float(np.mean([c.no_attack >= self.threshold for c in self.cases]))

    @property
    def base_rate(self) -> float | None:
        if any(c.base is None for c in self.cases):
            return None
        return float(np.mean([c.base >= self.threshold for c in self.cases]))

    def curve(self) -> dict | None:
        """Checkpoint -> ASR there, for attacks that report a curve (cases the erasure already failed count)."""
        points = next((c.curve for c in self.cases if c.curve), None)
        if points is None:
            return None
        return {k: float(np.mean([c.success if c.curve is None else c.curve[k] >= self.threshold
                                  for c in self.cases])) for k in points}

    def baseline_curve(self) -> dict | None:
        """Checkpoint -> the baseline's rate there, over the cases the attack ran on (relearn's new word)."""
        curves = [c.baseline_curve for c in self.cases if c.baseline_curve]
        if not curves:
            return None
        return {k: float(np.mean([curve[k] >= self.threshold for curve in curves])) for k in curves[0]}

    @property
    def queries(self) -> int:
        return sum(c.queries for c in self.cases)

    def to_dict(self) -> dict:
        return {"attack": self.attack, "budget": self.budget, "options": self.options, "asr": self.asr,
                "no_attack_rate": self.no_attack_rate, "base_rate": self.base_rate, "queries": self.queries,
                "unet_evaluations": self.unet_evaluations, "seconds": round(self.seconds, 3), "curve": self.curve(),
                "baseline_curve": self.baseline_curve(),
                "cases": [asdict(c) for c in self.cases]}


class Context:
    """What an attack may use: the attacked pipeline, the reference, the detector, generation and counting."""

    def __init__(self, pipe, reference, detector: Detector, concept: str, generation: Generation,
                 progress: bool = True):
        self.pipe, self.reference, self.detector = pipe, reference, detector
        self.concept, self.generation, self.progress = concept, generation, progress
        self.concept_prompts: list[str] = []  # the prompts attacked (what attacks that learn from images use)
        self.cases: list[Case] = []  # this process's cases, with their no-attack scores
        self.seed = 0  # what attacks that learn once per run (textual inversion, relearn) seed their draws with
        self.unet_evaluations = 0
        self.cache: dict = {}  # what an attack computes once per run (a concept vector, a learned word), by key
        self._reference_latents: dict = {}

    def images(self, pipe=None, *, prompts=None, prompt_embeds=None, pooled_prompt_embeds=None,
               seeds) -> np.ndarray:
        """uint8 (n, h, w, 3): one image per seed, prompt i (or embedding row i) at seeds[i]. SDXL, SD3 and FLUX
        take the pooled vector beside the token embeddings."""
        embeds = None if prompt_embeds is None else dict(prompt_embeds=prompt_embeds, **(
            {} if pooled_prompt_embeds is None else {"pooled_prompt_embeds": pooled_prompt_embeds}))
        return (self._call(pipe or self.pipe, prompts, embeds, seeds, "np") * 255).round().clip(
            0, 255).astype(np.uint8)

    def scores(self, images: np.ndarray) -> np.ndarray:
        return self.detector(images)

    def reference_latents(self, prompt: str, seed: int) -> torch.Tensor:
        """x_0 of the reference pipeline's image of `prompt` at `seed` (the target of the white-box attacks)."""
        key = (prompt, seed)
        if key not in self._reference_latents:
            if self.reference is None:
                raise ValueError("This attack needs target images of the concept: pass `reference=` (the unerased "
                                 "pipeline) to attacks.run.")
            self._reference_latents[key] = self._call(self.reference, [prompt], None, [seed], "latent")
        return self._reference_latents[key]

    @torch.no_grad()
    def _call(self, pipe, prompts, embeds: dict | None, seeds, output_type):
        g = self.generation
        with _scheduler(pipe, g.scheduler), _quiet(pipe):
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
            kwargs = dict(prompt=list(prompts)) if prompts is not None else dict(embeds)
            out = pipe(**kwargs, num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale,
                       generator=generators, height=g.height, width=g.width, output_type=output_type).images
        return out if output_type == "latent" else np.asarray(out)

    @contextmanager
    def counting(self):
        """Count the samples the attacked denoiser evaluates (a guided step of one image counts 2)."""
        model = getattr(self.pipe, family_of(self.pipe).denoiser)

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.unet_evaluations += int(sample.shape[0])

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


class Tries:
    """An attack's tries on one case: each is generated at the case's seed and judged, and the best is kept."""

    def __init__(self, context: Context, case: Case):
        self.context, self.case = context, case
        self.score, self.image, self.found, self.queries = -1.0, None, None, 0

    def judge(self, found: str, **inputs) -> bool:
        """Generate `inputs` (`prompts=` or `prompt_embeds=`) at the case's seed; True when the concept shows."""
        return self.verdict(found, self.context.images(**inputs, seeds=[self.case.seed]))

    def verdict(self, found: str, image: np.ndarray) -> bool:
        """Judge one image (1, h, w, 3) an attack made its own way; True when the concept shows."""
        score = float(self.context.scores(image)[0])
        self.queries += 1
        if score > self.score:
            self.score, self.image, self.found = score, image[0], found
        return score >= self.context.detector.threshold

    def result(self) -> tuple:
        """What `Attack.run` returns: (best score, its image, what was found, queries)."""
        return self.score, self.image, self.found, self.queries


@contextmanager
def _scheduler(pipe, name: str | None):
    if name is None:
        yield
        return
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


@contextmanager
def _quiet(pipe):
    had = "_progress_bar_config" in pipe.__dict__
    saved = dict(pipe.__dict__.get("_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = saved
        else:
            del pipe._progress_bar_config


@dataclass(frozen=True)
class Attack:
    """An attack: its function, budgets (`quick` for tiny models, `paper` for the reference's settings), and whether
    it needs the reference model.

    `run(context, case, rng, **options) -> (score, image, adversarial, queries)` attacks one case that the erased
    model does not already show; `score` is the best detector score it reached, `image` that image."""

    name: str
    run: Callable
    budgets: dict
    needs_reference: bool = False
    paper: str = ""
    # check(setup, **settings), setup = {family, generation, concept, prompts}: bad input fails before any image
    check: Callable | None = None
    families: tuple[str, ...] | None = None  # the families it runs on (None: all), checked before any image
    family_note: str = ""  # why not the others


def replace_concept(prompt: str, concept: str, word: str) -> str | None:
    """`prompt` with every whole-word `concept` (any case) replaced by `word`, spaces tidied; None when the prompt
    does not name the concept (an I2P-style prompt for "nudity")."""
    pattern = re.compile(rf"\b{re.escape(concept)}\b", re.IGNORECASE)
    if not pattern.search(prompt):
        return None
    return " ".join(pattern.sub(word, prompt).split())


def time_it():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
