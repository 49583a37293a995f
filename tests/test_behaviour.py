"""Behaviour on the bundled shapes model: erased concepts vanish from generated images, the rest stays.

Every method the project adds gets a row in METHODS. Thresholds (from the ground-truth issue): after erasing
"circle", circle prompts show a circle in ≤ 10% of images, synonym prompts in ≤ 20%, every other shape keeps
≥ 90% of its base accuracy; after `unload_erasure()` the base images return exactly.

Closed-form edits use `shapes.erasure_recipe` (anchor another shape, preserve the other shapes bare and in
colour) and every token column (token_policy="all"): measured in docs/shapes.md, the paper defaults (anchor
"shape", last-subject columns, bare preserve names) leave the circle at 4-17% and cost heart/triangle up to half
their accuracy on this model, because "shape" encodes like the empty prompt and the model also carries the shape
in the colour and padding tokens.
"""

import numpy as np
import pytest

import diffusers_erase as de

IMAGES_PER_PROMPT = 2  # × 6 direct and 6 synonym prompts per shape, paired seeds
METHODS = [
    ("uce", {"token_policy": "all"}),
    ("rece", {"epochs": 1}),  # paper setting for objects; RECE always uses every token column
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
    pipe.erase_concept("circle", method=method, **shapes.erasure_recipe("circle"), **options)
    try:
        after = shapes.evaluate(pipe, erased=["circle"], concepts=list(shapes.SHAPES), baseline=baseline,
                                progress=False)
    finally:
        pipe.unload_erasure()
    score = after.erased[0]
    assert score.efficacy <= 0.10, after.to_markdown()
    assert score.residue <= 0.20, after.to_markdown()
    for shape in others:
        assert after.scores[shape].direct >= 0.9 * baseline.scores[shape].direct, after.to_markdown()
        # synonym prompts ("a red box") are not in the preserve set: specificity on prompts the edit never saw
        assert after.scores[shape].synonym >= 0.9 * baseline.scores[shape].synonym, after.to_markdown()


def test_unload_gives_back_the_same_images(shapes_run):
    shapes, pipe, baseline = shapes_run
    pipe.erase_concept("circle", anchor="shape")
    pipe.unload_erasure()
    again = shapes.evaluate(pipe, concepts=["circle"], images_per_prompt=IMAGES_PER_PROMPT, progress=False)
    for prompt, images in again.images.items():
        assert np.array_equal(images, baseline.images[prompt]), prompt


# SPM has no behavioural test here yet: on this model no measured budget meets the SPM issue's bar (star ≤ 15%,
# other shapes ≥ 90%); the sweep is in docs/methods/spm.md ("Measured on the shapes model"). Its mechanics
# (gating, per-sample gates, transfer, round trips) are tested on tiny pipelines in tests/test_spm.py.
