"""Behaviour on the bundled shapes model, part 2: erasures carried to a fine-tuned variant (SPM's transfer, UCE's
text-space map) and specificity beyond the preserve list (MACE). Thresholds and recipes as in test_behaviour.py;
a file of its own so that the two pytest-xdist workers each take half of the shapes-model evaluations."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_behaviour import IMAGES_PER_PROMPT, SPM_STAR, assert_erased

import diffusers_erase as de


@pytest.fixture(scope="module")
def shapes_run():
    """(shapes, pipeline) without the baseline evaluation: each test here compares with its own base."""
    from diffusers_erase import shapes

    return shapes, de.enable_erasure(shapes.load_pipeline()), None

@pytest.fixture(scope="module")
def variant_run(shapes_run):
    shapes, _, _ = shapes_run
    variant = de.enable_erasure(fine_tuned_variant(shapes))
    variant_base = shapes.evaluate(variant, concepts=list(shapes.SHAPES), images_per_prompt=IMAGES_PER_PROMPT,
                                   progress=False)
    return variant, variant_base


def test_spm_membrane_transfers_to_a_fine_tuned_variant(shapes_run, variant_run):
    """The paper's transfer: a membrane trained on one checkpoint erases on another of the same family. The
    variant is the shipped model fine-tuned for a few steps on the outlined-style subset of the world."""
    shapes, _, _ = shapes_run
    variant, variant_base = variant_run
    variant.load_erasure_adapter(SPM_STAR)
    after = shapes.evaluate(variant, erased=["star"], concepts=list(shapes.SHAPES), baseline=variant_base,
                            progress=False)
    assert_erased(shapes, after, variant_base, "star", max_rate=0.15)
    variant.unload_erasure()


def test_uce_adapter_transfers_to_a_fine_tuned_variant_exactly(shapes_run, variant_run, tmp_path):
    """A text-space map depends on the text encoder only: made on the shipped model, loaded on a fine-tuned UNet
    with the same text encoder it is the edit UCE computes on that UNet, and it erases there."""
    shapes, pipe, _ = shapes_run
    variant, variant_base = variant_run
    recipe = shapes.erasure_recipe("circle")
    pipe.erase_concept("circle", token_policy="all", **recipe)
    path = pipe.save_erasure_adapter(tmp_path)
    pipe.unload_erasure()
    variant.load_erasure_adapter(path)
    try:
        loaded = {n: p.detach().clone() for n, p in variant.unet.named_parameters() if ".attn2.to_" in n}
        after = shapes.evaluate(variant, erased=["circle"], concepts=list(shapes.SHAPES), baseline=variant_base,
                                progress=False)
        variant.unload_erasure()
        variant.erase_concept("circle", token_policy="all", **recipe)
        for name, param in variant.unet.named_parameters():
            if name in loaded:
                assert torch.allclose(loaded[name], param, atol=1e-6, rtol=0), name
    finally:
        variant.unload_erasure()
    assert_erased(shapes, after, variant_base, "circle", max_rate=0.10)


def fine_tuned_variant(shapes, steps: int = 30, lr: float = 1e-4, seed: int = 0):
    """A copy of the shipped model after `steps` of the usual denoising loss on outlined shapes only."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    pipe = shapes.load_pipeline()
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        scenes = [shapes.sample_scene(rng, style="outlined") for _ in range(16)]
        images = torch.from_numpy(np.stack([np.asarray(shapes.render(s)) for s in scenes])).permute(0, 3, 1, 2)
        with torch.no_grad():
            latents = vae.encode(images.float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
            ids = tokenizer([shapes.world.sample_caption(s, rng) for s in scenes], padding="max_length",
                            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            hidden = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (len(scenes),), generator=generator)
        loss = F.mse_loss(unet(noise_scheduler.add_noise(latents, noise, t), t, hidden).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    return pipe


# --- Specificity beyond the preserve list (MACE) -------------------------------------------------------------
# The specificity issue's bars: erase with `preserve=` only the other shapes' bare names ("a square", …); the
# erased shape ≤ 10% direct, ≤ 20% synonyms, every other shape ≥ 90% of base on held-out prompts (colours,
# backgrounds, styles and framings that are in no preserve list). Trained once with MACE's defaults and shipped:
#     python benchmarks/specificity.py --concepts circle --configs mace --save tests/data
#     python benchmarks/specificity.py --together --concepts circle star triangle --configs mace --save tests/data
SPECIFIC = [("mace_circle", ["circle"]), ("mace_circle+star+triangle", ["circle", "star", "triangle"])]


@pytest.fixture(scope="module")
def held_out_base(shapes_run):
    shapes, pipe, _ = shapes_run
    return shapes.evaluate(pipe, concepts=list(shapes.SHAPES), images_per_prompt=IMAGES_PER_PROMPT, held_out=True,
                           progress=False)


@pytest.mark.parametrize("name,erased", SPECIFIC, ids=[n for n, _ in SPECIFIC])
def test_mace_erases_with_bare_preserve_names_and_keeps_neighbours_in_other_contexts(shapes_run, held_out_base,
                                                                                      name, erased):
    shapes, pipe, _ = shapes_run
    [record] = pipe.load_erasure_adapter(Path(__file__).parent / "data" / f"{name}.safetensors")
    try:
        assert record.method == "mace" and record.concepts == erased
        assert record.preserve == [f"a {s}" for s in shapes.SHAPES if s not in erased]
        after = shapes.evaluate(pipe, erased=erased, concepts=list(shapes.SHAPES), baseline=held_out_base,
                                held_out=True, progress=False)
    finally:
        pipe.unload_erasure()
    for score in after.erased:
        assert score.efficacy <= 0.10 and score.residue <= 0.20, after.to_markdown()
    for shape in shapes.SHAPES:
        if shape not in erased:
            assert after.scores[shape].held_out >= 0.9 * held_out_base.scores[shape].held_out, after.to_markdown()
            assert after.scores[shape].direct >= 0.9 * held_out_base.scores[shape].direct, after.to_markdown()
