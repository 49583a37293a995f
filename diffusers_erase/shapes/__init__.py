"""The shapes world: a tiny, really-trained Stable Diffusion 1.x model whose concepts can be checked exactly.

    from diffusers_erase import shapes
    pipe = shapes.load_pipeline()                     # a diffusers StableDiffusionPipeline, 32x32 images
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    result = shapes.evaluate(pipe, concepts=["circle", "square"], images_per_prompt=4)

See docs/shapes.md for the world, the model, its training recipe and its measured accuracy.
"""

from pathlib import Path

import torch

from ..families import dtype_keyword
from . import world
from .classifier import ShapesClassifier, classify, load_classifier
from .evaluate import EvaluationResult, evaluate
from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    CONCEPTS,
    SHAPES,
    STYLES,
    SYNONYMS,
    Prompt,
    concept_attribute,
    concept_prompts,
    direct_prompts,
    erasure_recipe,
    held_out_prompts,
    render,
    sample_scene,
    synonym_prompts,
)

PIPELINE_DIR = Path(__file__).parent / "assets" / "pipeline"

__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLORS", "CONCEPTS", "EvaluationResult", "PIPELINE_DIR", "Prompt",
           "SHAPES", "STYLES", "SYNONYMS", "ShapesClassifier", "classify", "concept_attribute", "concept_prompts",
           "direct_prompts", "erasure_recipe", "evaluate", "held_out_prompts", "load_classifier", "load_pipeline",
           "render", "sample_scene", "synonym_prompts", "world"]


def load_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu", *, model: str = "sd1",
                  torch_dtype: torch.dtype | None = None):
    """Load a bundled shapes-world pipeline (weights are stored in fp16) in `dtype` on `device`: `model="sd1"`
    (default) the StableDiffusionPipeline, `model="flux"` (or `load_pipeline("flux")`) the FluxPipeline of the
    same world (`shapes/train_flux.py`). `torch_dtype`: the older name diffusers used, still accepted."""
    from diffusers import FluxPipeline, StableDiffusionPipeline

    if isinstance(dtype, str):  # load_pipeline("flux")
        model, dtype = dtype, torch.float32
    dtype = torch_dtype if torch_dtype is not None else dtype
    if model not in MODELS:
        raise ValueError(f"Unknown shapes model {model!r}; choose one of {', '.join(MODELS)}.")
    folder, trainer = MODELS[model]
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"the shapes model {model!r} is not in {folder}; train and export it with "
                                f"`python -m {trainer}` then `--export`")
    if model == "flux":
        pipe = FluxPipeline.from_pretrained(folder, **dtype_keyword(dtype))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **dtype_keyword(dtype), safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


FLUX_PIPELINE_DIR = Path(__file__).parent / "assets" / "pipeline-flux"
MODELS = {"sd1": (PIPELINE_DIR, "diffusers_erase.shapes.train"),
          "flux": (FLUX_PIPELINE_DIR, "diffusers_erase.shapes.train_flux")}
