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

from pathlib import Path

import numpy as np
import pytest
import torch

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


def assert_erased(shapes, after, base, concept: str, max_rate: float) -> None:
    """`concept` shows in at most `max_rate` of its images; every other shape keeps ≥ 90% of `base`'s accuracy."""
    assert after.erased[0].efficacy <= max_rate, after.to_markdown()
    for shape in shapes.SHAPES:
        if shape != concept:
            assert after.scores[shape].direct >= 0.9 * base.scores[shape].direct, after.to_markdown()


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


# --- SPM membranes --------------------------------------------------------------------------------------------
# Thresholds from the SPM issue: star prompts show a star in ≤ 15% of images, every other shape keeps ≥ 90% of its
# base accuracy. The membrane is trained once (8 min) and shipped, ≤ 1 MB:
#     python benchmarks/spm.py --skip-overhead --iterations 900 --la-strength 30 --la-samples 8 --anchor circle \
#         --save tests/data/spm_star.safetensors --out benchmarks/results/spm_shapes_recipe.json
# i.e. SPMConfig.tiny() toward the shapes recipe's anchor ("" is a poor surrogate on this model, as for UCE).
# Training itself is covered on tiny pipelines in tests/test_spm.py.

SPM_STAR = Path(__file__).parent / "data" / "spm_star.safetensors"


def test_shipped_membrane_is_small_and_records_how_it_was_made(shapes_run):
    _, pipe, _ = shapes_run
    [record] = pipe.load_erasure_adapter(SPM_STAR)
    pipe.unload_erasure()
    assert SPM_STAR.stat().st_size <= 1_000_000
    assert record.method == "spm" and record.concepts == ["star"] and record.anchors == ["circle"]
    assert record.options["la_strength"] == 30.0 and record.options["iterations"] == 900


def test_spm_membrane_erases_star_and_keeps_other_shapes(shapes_run):
    shapes, pipe, baseline = shapes_run
    pipe.load_erasure_adapter(SPM_STAR)
    try:
        after = shapes.evaluate(pipe, erased=["star"], concepts=list(shapes.SHAPES), baseline=baseline,
                                progress=False)
    finally:
        pipe.unload_erasure()
    assert_erased(shapes, after, baseline, "star", max_rate=0.15)


SPM_HEART = Path(__file__).parent / "data" / "spm_heart.safetensors"  # same recipe, --concept heart


def test_two_membranes_combined_erase_both_and_unload_exactly(shapes_run):
    shapes, pipe, baseline = shapes_run
    pipe.load_erasure_adapter(SPM_STAR, adapter_name="star")
    pipe.load_erasure_adapter(SPM_HEART, adapter_name="heart")
    try:
        after = shapes.evaluate(pipe, erased=["star", "heart"], concepts=list(shapes.SHAPES), baseline=baseline,
                                progress=False)
    finally:
        pipe.unload_erasure()
    for score in after.erased:
        assert score.efficacy <= 0.15, after.to_markdown()
    # No specificity bar here: alone, the heart membrane already costs triangle a third (docs/methods/spm.md).
    assert after.scores["circle"].direct >= 0.9 * baseline.scores["circle"].direct, after.to_markdown()
    again = shapes.evaluate(pipe, concepts=["star"], images_per_prompt=IMAGES_PER_PROMPT, progress=False)
    for prompt, images in again.images.items():
        assert np.array_equal(images, baseline.images[prompt]), prompt


def _latents(pipe, prompts):
    import torch

    from diffusers_erase.shapes.evaluate import DEFAULT_GUIDANCE

    generator = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
    return pipe(prompts, num_inference_steps=20, guidance_scale=DEFAULT_GUIDANCE, generator=generator,
                output_type="latent").images


def test_spm_gate_opens_on_the_concept_and_less_elsewhere(shapes_run):
    """Gating moves unrelated prompts less than the static membrane. Per-prompt latent MSE to the base images,
    compared by the median: one trajectory that flips to another (still correct) drawing saturates its MSE at
    about 3.5 whatever the strength above a threshold ("a red circle", the anchor shape, gate 0.49, does with the
    shipped membrane), and would decide a mean on its own (docs/methods/spm.md)."""
    shapes, pipe, _ = shapes_run
    unrelated = ["a red circle", "a blue square", "a striped green heart", "an orange cross on a black background",
                 "a yellow triangle", "a purple circle on a gray background", "an outlined blue cross",
                 "a green square"]
    base = _latents(pipe, unrelated)
    pipe.load_erasure_adapter(SPM_STAR)
    try:
        gates = pipe.erasure_gates(["a red star", "a striped blue star", *unrelated])["default"]
        gated = _latents(pipe, unrelated)
        pipe.set_erasure_adapters("default", gating=False)
        static = _latents(pipe, unrelated)
    finally:
        pipe.unload_erasure()
    assert min(gates[:2]) >= 0.99, gates  # the concept's own prompts (token overlap)
    assert max(gates[2:]) < 0.9, gates
    gated_mse, static_mse = [((x - base) ** 2).mean(dim=(1, 2, 3)).median() for x in (gated, static)]
    assert gated_mse < 0.5 * static_mse, (gates, gated_mse, static_mse)


# --- Trained methods, shipped adapters ------------------------------------------------------------------------
# The trained-methods issue's bar: circle ≤ 10% direct, ≤ 20% synonyms, every other shape ≥ 90% of base. Each was
# trained once with its tiny budget and shipped as a dense adapter; training itself is covered on tiny pipelines
# (tests/test_esd.py, tests/test_advunlearn.py).
#     ESD (esd-x, ESDConfig.tiny(), toward ESD's own "", 55 s, ≈ 1 MB):
#         python benchmarks/trained.py --save tests/data/esd_circle.safetensors
#     AdvUnlearn (AdvUnlearnConfig.tiny(), text_encoder_full, the circle recipe's preserve set as retain prompts):
#         python benchmarks/trained.py --method advunlearn --save tests/data/advunlearn_circle.safetensors

TRAINED_CIRCLE = [("esd", "unet"), ("advunlearn", "text_encoder")]


@pytest.mark.parametrize("method,component", TRAINED_CIRCLE, ids=[m for m, _ in TRAINED_CIRCLE])
def test_a_shipped_trained_erasure_removes_circle_and_keeps_other_shapes(shapes_run, method, component):
    shapes, pipe, baseline = shapes_run
    model = getattr(pipe, component)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    [record] = pipe.load_erasure_adapter(Path(__file__).parent / "data" / f"{method}_circle.safetensors")
    try:
        assert record.method == method and all(isinstance(d, de.Dense) for d in record.edit.deltas.values())
        assert all(n.startswith(f"{component}.") for n in record.modules)
        after = shapes.evaluate(pipe, erased=["circle"], concepts=list(shapes.SHAPES), baseline=baseline,
                                progress=False)
    finally:
        pipe.unload_erasure()
    assert_erased(shapes, after, baseline, "circle", max_rate=0.10)
    assert after.erased[0].residue <= 0.20, after.to_markdown()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
