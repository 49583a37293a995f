"""The general evaluator: any pipeline, any detector; on the shapes model it sees UCE's recipe erasure as the shapes
evaluator does; bad input fails before any image."""

import numpy as np
import pytest
from conftest import make_sdxl_pipeline

import diffusers_erase as de
from diffusers_erase import attacks, detectors, shapes
from diffusers_erase.evaluation import shapes_setup

CONSTANT = {v: detectors.Detector(f"always {v}", lambda images, v=v: np.full(len(images), v)) for v in (0.0, 1.0)}


def test_on_the_shapes_model_it_sees_the_recipe_erasure_of_circle():
    base, pipe = shapes.load_pipeline(), shapes.load_pipeline()
    recipe = shapes.erasure_recipe("circle")
    de.erase_concept(pipe, "circle", method="uce", anchor=recipe["anchor"], preserve=recipe["preserve"],
                     token_policy="all")
    result = de.evaluate(pipe, **shapes_setup("circle"), reference=base, seeds=(0,), progress=False)
    assert result.efficacy.rate_before >= 0.9 and result.efficacy.rate <= 0.1
    assert result.residue.rate <= 0.2 and result.specificity_ratio >= 0.9
    assert set(result.others) == {"square", "triangle", "star", "heart", "cross"}
    assert "| circle |" in result.to_markdown() and result.to_dict()["specificity_ratio"] == result.specificity_ratio


def test_any_pipeline_and_detector(tokenizer_dir):
    """An SDXL pipeline with detectors that always / never fire: the rates are exactly theirs, before and after."""
    pipe = make_sdxl_pipeline(tokenizer_dir)
    generation = attacks.Generation(num_inference_steps=2, height=32, width=32)
    result = de.evaluate(pipe, "cat", CONSTANT[1.0], prompts=["a cat"], synonyms=["a kitten"],
                         others={"dog": (["a dog", "a puppy"], CONSTANT[0.0])}, reference=pipe, seeds=(0, 1),
                         generation=generation, batch_size=3, progress=False)
    assert (result.efficacy.rate, result.efficacy.rate_before, result.residue.rate) == (1.0, 1.0, 1.0)
    assert result.others["dog"].rate == 0.0 and result.specificity_ratio is None  # nothing to compare against
    assert result.settings["seeds"] == [0, 1]


@pytest.mark.parametrize("kwargs, match", [
    ({"others": {"dog": ["a dog"]}}, "must be \\(a list of prompts, a Detector\\)"),
    ({"others": {"dog": ("a dog", CONSTANT[0.0])}}, "must be \\(a list of prompts"),
    ({"seeds": ()}, "at least one seed"),
    ({"prompts": "a cat"}, "not one string"),
    ({"detector": detectors.Detector("bad", lambda images: np.full(len(images), np.nan))}, "not finite"),
])
def test_bad_input_fails_before_any_image(tokenizer_dir, kwargs, match, monkeypatch):
    pipe = make_sdxl_pipeline(tokenizer_dir)
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("an image was generated"))
    options = {"detector": CONSTANT[1.0], **kwargs}
    with pytest.raises(ValueError, match=match):
        de.evaluate(pipe, "cat", options.pop("detector"), progress=False, **options)
