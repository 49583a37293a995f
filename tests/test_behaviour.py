"""Behaviour on the bundled shapes model: erased concepts vanish from generated images, the rest stays.

Every method the project adds gets a row in METHODS. Thresholds (from the ground-truth issue): after erasing
"circle", circle prompts show a circle in ≤ 10% of images, synonym prompts in ≤ 20%, every other shape keeps
≥ 90% of its base accuracy; after `unload_erasure()` the base images return exactly.
"""

import numpy as np
import pytest

import diffusers_erase as de
from diffusers_erase.cli import PIPELINE_DIR

pytestmark = pytest.mark.skipif(
    not (PIPELINE_DIR / "model_index.json").exists(), reason=f"the shapes model is not exported yet ({PIPELINE_DIR})"
)

IMAGES_PER_PROMPT = 2  # × 6 direct and 6 synonym prompts per shape, paired seeds
METHODS = [
    ("uce", {}),
    ("rece", {"epochs": 1}),  # paper setting for objects
]


@pytest.fixture(scope="module")
def shapes_run():
    from diffusers_erase import shapes

    pipe = de.enable_erasure(shapes.load_pipeline())
    baseline = shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=IMAGES_PER_PROMPT, progress=False)
    return shapes, pipe, baseline


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_erasing_circle_removes_it_and_keeps_other_shapes(shapes_run, method, options):
    shapes, pipe, baseline = shapes_run
    others = [s for s in shapes.SHAPES if s != "circle"]
    pipe.erase_concept("circle", method=method, anchor="shape", preserve=others, **options)
    try:
        after = shapes.evaluate(pipe, erased=["circle"], concepts=list(shapes.SHAPES), baseline=baseline, progress=False)
    finally:
        pipe.unload_erasure()
    score = after.erased[0]
    assert score.efficacy <= 0.10, after.to_markdown()
    assert score.residue <= 0.20, after.to_markdown()
    for shape in others:
        assert after.scores[shape].direct >= 0.9 * baseline.scores[shape].direct, after.to_markdown()


def test_unload_gives_back_the_same_images(shapes_run):
    shapes, pipe, baseline = shapes_run
    pipe.erase_concept("circle", anchor="shape")
    pipe.unload_erasure()
    again = shapes.evaluate(pipe, concepts=["circle"], images_per_prompt=IMAGES_PER_PROMPT, progress=False)
    for prompt, images in again.images.items():
        assert np.array_equal(images, baseline.images[prompt]), prompt
