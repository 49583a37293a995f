"""Few-shot erasing: the reference's objective through the engine, its images input and bad input, and its
behaviour on the shapes model."""

import numpy as np
import pytest
import torch
from conftest import changed, make_sd_pipeline, snapshot
from PIL import Image

import diffusers_erase as de
from diffusers_erase import shapes
from diffusers_erase.families import train_group


def _circles(count=8):
    rng = np.random.default_rng(0)
    return [shapes.render(shapes.sample_scene(rng, shape="circle")) for _ in range(count)]


def test_fewshot_erases_circle_from_the_shapes_model_and_unload_restores_the_text_encoder():
    pipe = shapes.load_pipeline()
    before = snapshot(pipe)
    record = de.erase_concept(pipe, "circle", method=de.FewShotConfig.tiny(images=_circles()))
    assert {n.rpartition(".")[0] for n in record.edit.deltas} == set(train_group(pipe, "mlp-final-attn"))
    assert all(n.startswith("text_encoder.") for n in changed(before, snapshot(pipe)))
    result = shapes.evaluate(pipe, erased=["circle"], concepts=["circle", "triangle", "star", "cross"],
                             images_per_prompt=2, progress=False)
    score = result.erased[0]
    assert score.efficacy <= 0.10 and score.residue <= 0.20  # measured 8% / 8%
    # Specificity is the method's weak side here: gradient ascent through the shared text encoder also moves
    # the anchor-like neighbour "square" (67% measured, docs/methods/fewshot.md); the other shapes stay.
    assert min(result.scores[c].direct for c in ("triangle", "star", "cross")) >= 0.9
    de.unload_erasure(pipe)
    assert changed(before, snapshot(pipe)) == []


def test_the_loss_ascends_the_reference_denoising_loss(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    losses = []
    de.erase_concept(pipe, "cat", method="fewshot", zero_shot=True, lr=1e-2, iterations=6,
                     callback=lambda i, loss: losses.append(loss))
    assert len(losses) == 6 and all(loss <= 0 for loss in losses)  # −MSE


def test_a_folder_of_images_is_read(tokenizer_dir, tmp_path):
    for i, image in enumerate(_circles(3)):
        image.save(tmp_path / f"{i}.png")
    pipe = make_sd_pipeline(tokenizer_dir)
    record = de.erase_concept(pipe, "cat", method="fewshot", images=str(tmp_path), lr=1e-3, epochs=1)
    assert record.method == "fewshot" and "images" not in record.options


@pytest.mark.parametrize("setup, match", [
    (lambda d: None, "holds no image"),
    (lambda d: (d / "notes.txt").write_text("x"), "not .png/.jpg/.jpeg"),
    (lambda d: (d / "broken.png").write_bytes(b"not an image"), "cannot be read"),
    (lambda d: Image.new("L", (8, 8)).save(d / "grey.png"), "mode 'L'"),
])
def test_bad_image_folders_are_refused_and_change_nothing(tokenizer_dir, tmp_path, setup, match):
    setup(tmp_path)
    pipe = make_sd_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=match):
        de.erase_concept(pipe, "cat", method="fewshot", images=str(tmp_path))
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []
    assert all(not m._forward_hooks for m in pipe.text_encoder.modules())


@pytest.mark.parametrize("options, match", [
    ({}, "pass `images=`"),
    ({"zero_shot": True, "train_method": "esd-x"}, "UNet group"),
    ({"zero_shot": True, "concept_type": "scene"}, "concept_type"),
    ({"images": "/no/such/folder"}, "not a folder"),
])
def test_bad_options_are_refused(tokenizer_dir, options, match):
    with pytest.raises(ValueError, match=match):
        de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="fewshot", **options)


def test_anchor_and_preserve_are_refused(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    with pytest.raises(ValueError, match="no anchor and no preserve"):
        de.erase_concept(pipe, "cat", method="fewshot", zero_shot=True, preserve=["dog"])
    with pytest.raises(ValueError, match="no anchor and no preserve"):
        de.erase_concept(pipe, "cat", method="fewshot", zero_shot=True, anchor="dog")


def test_a_shapes_adapter_reloads_onto_a_fresh_pipeline(tmp_path):
    pipe = shapes.load_pipeline()
    de.erase_concept(pipe, "circle", method=de.FewShotConfig.tiny(images=_circles(4)))
    path = de.save_erasure_adapter(pipe, tmp_path)
    fresh = shapes.load_pipeline()
    de.load_erasure_adapter(fresh, path)
    for name, value in snapshot(pipe).items():
        assert torch.equal(snapshot(fresh)[name], value), name
