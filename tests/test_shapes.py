"""Tests of the shapes world: renderer, captions, tokenizer, classifier, and the shipped model."""

import numpy as np
import pytest
import torch

from diffusers_erase.families import dtype_keyword
from diffusers_erase.shapes import world
from diffusers_erase.shapes.train import PIPELINE_DIR, TOKENIZER_DIR

# --- world -------------------------------------------------------------------------------------

def test_render_is_deterministic():
    scenes_a = [world.sample_scene(np.random.default_rng(7)) for _ in range(3)]
    scenes_b = [world.sample_scene(np.random.default_rng(7)) for _ in range(3)]
    assert scenes_a == scenes_b
    a, b = world.render_batch(scenes_a), world.render_batch(scenes_b)
    assert a.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    other = world.render(world.sample_scene(np.random.default_rng(8)))
    assert not np.array_equal(np.asarray(other), a[0])


def test_render_draws_the_asked_attributes():
    scene = world.Scene("square", "blue", "solid", "white", x=16, y=16, radius=11, angle=0)
    image = np.asarray(world.render(scene)).astype(int)
    assert np.abs(image[0, 0] - [245, 245, 245]).max() <= 1  # corner: background
    assert np.abs(image[16, 16] - [35, 75, 220]).max() <= 1  # centre: the blue object
    outlined = np.asarray(world.render(world.Scene("square", "blue", "outlined", "white", 16, 16, 11, 0))).astype(int)
    assert np.abs(outlined[16, 16] - [245, 245, 245]).max() <= 1  # an outline leaves the middle empty
    striped = np.asarray(world.render(world.Scene("square", "blue", "striped", "white", 16, 16, 11, 0))).astype(int)
    column = striped[8:24, 16]
    assert column.std(axis=0).max() > 30  # stripes alternate along the column


def test_sample_scene_pins_attributes():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, shape="heart", style="striped") for _ in range(20)]
    assert {s.shape for s in scenes} == {"heart"} and {s.style for s in scenes} == {"striped"}
    assert len({s.color for s in scenes}) > 1


def test_captions_use_synonyms_and_empty_captions():
    rng = np.random.default_rng(0)
    captions = [world.sample_caption(world.sample_scene(rng, shape="circle", color="red"), rng) for _ in range(2000)]
    text = " | ".join(captions)
    for word in ("circle", "disk", "round shape", "red", "crimson", "scarlet"):
        assert word in text, word
    empty = captions.count("") / len(captions)
    assert 0.07 < empty < 0.13
    rng = np.random.default_rng(1)
    outlined = " | ".join(world.sample_caption(world.sample_scene(rng, style="outlined"), rng) for _ in range(500))
    assert "line drawing of" in outlined and "outlined" in outlined
    rng = np.random.default_rng(2)
    crosses = " | ".join(world.sample_caption(world.sample_scene(rng, shape="cross"), rng) for _ in range(500))
    assert "plus sign" in crosses


def test_prompt_builders():
    assert world.direct_prompts("circle")[0] == "a red circle"
    assert "a red disk" in world.synonym_prompts("circle")
    for concept in world.CONCEPTS:
        direct, synonym = world.concept_prompts(concept), world.concept_prompts(concept, synonyms=True)
        assert len(direct) == len(synonym) == 6
        attribute = world.concept_attribute(concept)
        assert all(p.asks[attribute] == concept for p in direct + synonym)
        if attribute != "style":
            assert all(concept in p.text for p in direct)
            # Synonym prompts never use the concept's own word ("gray" vs "grey" is the one spelling pair).
            assert not any(f" {concept} " in f" {p.text} " for p in synonym), concept
    with pytest.raises(ValueError, match="unknown concept"):
        world.concept_attribute("hexagon")


def test_tokenizer_is_real_clip_bpe():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(tokenizer) == 49408
    # Ids checked against open_clip's own SimpleTokenizer (docs/shapes.md).
    assert tokenizer("a red disk").input_ids == [49406, 320, 736, 17970, 49407]
    assert tokenizer("a line drawing of a crimson plus sign").input_ids == [
        49406, 320, 1148, 3610, 539, 320, 19437, 3097, 2292, 49407]


# --- classifier --------------------------------------------------------------------------------

def test_classifier_accuracy_on_fresh_renders():
    from diffusers_erase.shapes.classifier import heldout_accuracy, load_classifier

    accuracy = heldout_accuracy(load_classifier(), count=600, seed=2026)
    assert all(value >= 0.97 for value in accuracy.values()), accuracy


def test_classify_reports_none_below_threshold():
    from diffusers_erase.shapes.classifier import classify, load_classifier

    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)  # a grey image: no shape at all
    row = classify(load_classifier(), flat, threshold=1.01)[0]
    assert row["shape"] == "none" and 0 <= row["shape_p"] <= 1


# --- shipped model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR, **dtype_keyword(torch.float32), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_sd1_architecture(shapes_pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(shapes_pipe, StableDiffusionPipeline)
    assert isinstance(shapes_pipe.tokenizer, CLIPTokenizer) and isinstance(shapes_pipe.text_encoder, CLIPTextModel)
    assert isinstance(shapes_pipe.vae, AutoencoderKL) and isinstance(shapes_pipe.unet, UNet2DConditionModel)
    size = sum(f.stat().st_size for f in PIPELINE_DIR.rglob("*") if f.is_file())
    assert size <= 25e6, size


def test_shipped_model_meets_the_accuracy_bar(shapes_pipe):
    from diffusers_erase.shapes.evaluate import evaluate

    # 6 shapes x 6 colours x 2 seeds per prompt, direct and synonym prompts, at the default
    # sampler settings; seeds are fixed, so the numbers are exactly reproducible.
    result = evaluate(shapes_pipe, concepts=list(world.SHAPES), images_per_prompt=2, progress=False)
    direct = np.mean([s.direct for s in result.scores.values()])
    colour_on_direct = np.mean([s.direct_other_attributes for s in result.scores.values()])
    synonym = np.mean([s.synonym for s in result.scores.values()])
    assert direct >= 0.85, result.to_markdown()
    assert colour_on_direct >= 0.85, result.to_markdown()
    assert synonym >= 0.75, result.to_markdown()


def test_evaluate_is_paired_and_serialises(shapes_pipe, tmp_path):
    import json

    from diffusers_erase.shapes.evaluate import evaluate

    base = evaluate(shapes_pipe, concepts=["circle", "red"], images_per_prompt=1, progress=False)
    again = evaluate(shapes_pipe, erased=["circle"], concepts=["red"], baseline=base,
                     grid_path=tmp_path / "grid.png", progress=False)
    # Same pipe, same seeds: identical images, so every "after" number equals its "before".
    assert np.array_equal(base.images["a red circle"], again.images["a red circle"])
    erased = again.erased[0]
    assert erased.efficacy == erased.efficacy_before and erased.specificity_ratio in (None, 1.0)
    assert json.loads(again.to_json())["erased"][0]["concept"] == "circle"
    assert "| circle |" in again.to_markdown()
    assert (tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(ValueError, match="settings"):
        evaluate(shapes_pipe, erased=["circle"], baseline=base, images_per_prompt=2, progress=False)
