"""Sampling-time guards (SLD, SAFREE): the math against its reference, per-sample action, the call context, the
pipelines they run in, stacking, and bad input. Save/load, unload and atomicity are in the contract matrix."""

import logging

import numpy as np
import pytest
import torch
from conftest import changed, make_sd_pipeline, snapshot
from PIL import Image

import diffusers_erase as de
from diffusers_erase.families import denoiser
from diffusers_erase.methods import safree, sld


def _images(pipe, prompts, steps=3, guidance=5.0, seeds=None, **kwargs):
    generators = [torch.Generator().manual_seed(i) for i in (seeds or range(len(prompts)))]
    return torch.from_numpy(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                                 output_type="np", **kwargs).images)


def _hooks(pipe) -> int:
    unet = denoiser(pipe)
    return len(unet._forward_pre_hooks) + len(unet._forward_hooks)


# ------------------------------------------------------------------------------------------------ SLD


@pytest.mark.parametrize("extra", [{}, {"num_images_per_prompt": 2, "negative_prompt": ["a dog", "a car"]}])
def test_sld_matches_diffusers_safe_pipeline(sd_pipe, extra):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    options = {"sld_warmup_steps": 1, "sld_guidance_scale": 50.0, "sld_threshold": 0.01, "sld_momentum_scale": 0.3,
               "sld_mom_beta": 0.4}  # warm-up and momentum both exercised in 4 steps
    components = {**sd_pipe.components, "safety_checker": None, "feature_extractor": None}
    safe = StableDiffusionPipelineSafe(**components, requires_safety_checker=False)
    safe.safety_concept = "a cat"
    safe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a tree"]
    seeds = range(len(prompts) * extra.get("num_images_per_prompt", 1))
    reference = _images(safe, prompts, steps=4, seeds=seeds, **options, **extra)
    de.erase_concept(sd_pipe, "a cat", method="sld", **options)
    assert torch.allclose(_images(sd_pipe, prompts, steps=4, seeds=seeds, **extra), reference, atol=1e-5)


def test_sld_guidance_formula_elementwise():
    settings = {**sld.SAFETY_CONFIGS["medium"]}
    uncond, text = torch.zeros(1, 4), torch.tensor([[0.0, 0.5, -0.5, 0.2]])
    safety = torch.tensor([[0.1, 0.0, 0.0, 0.2]])
    guidance, momentum = sld.safety_guidance(uncond, text, safety, None, step=10, settings=settings)
    # ε_c − ε_S = [-0.1, 0.5, -0.5, 0]: ≥ λ=0.01 → no guidance for elements 1 (and 3: 0 < λ gets |0|·s_S = 0)
    scale = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(guidance, (safety - uncond) * scale)
    assert torch.allclose(momentum, 0.6 * guidance)
    early, _ = sld.safety_guidance(uncond, text, safety, None, step=9, settings=settings)
    assert torch.equal(early, torch.zeros_like(early))  # warm-up: momentum builds, nothing applied


def test_sld_acts_per_sample_and_not_without_guidance(sd_pipe):
    base_single = _images(sd_pipe, ["a tree"], guidance=1.0)
    de.erase_concept(sd_pipe, "a cat", method="sld", sld_warmup_steps=0)
    batch = _images(sd_pipe, ["a cat", "a tree"])
    # a sample sees its own rows only
    assert torch.allclose(batch[1:], _images(sd_pipe, ["a tree"], seeds=[1]), atol=1e-5)
    assert torch.equal(_images(sd_pipe, ["a tree"], guidance=1.0), base_single)  # no guidance batch: nothing


def test_sld_presets_are_diffusers_safety_configs():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for name in ("weak", "medium", "strong", "max"):
        assert sld.SLDConfig.presets[name]["options"] == getattr(SafetyConfig, name.upper())
    defaults = sld.SLDConfig()
    assert {k: getattr(defaults, k) for k in SafetyConfig.MEDIUM} == SafetyConfig.MEDIUM


@pytest.mark.parametrize("options, match", [
    ({"sld_guidance_scale": 1.0}, "sld_guidance_scale must be > 1"),
    ({"sld_threshold": -0.1}, "sld_threshold must be ≥ 0"),
    ({"sld_mom_beta": 1.0}, r"sld_mom_beta must be in \[0, 1\)"),
    ({"sld_momentum_scale": -1.0}, "sld_momentum_scale must be ≥ 0"),
    ({"sld_warmup_steps": -1}, "sld_warmup_steps must be ≥ 0"),
])
def test_sld_bad_options_attach_nothing(sd_pipe, options, match):
    with pytest.raises(ValueError, match=match):
        de.erase_concept(sd_pipe, "a cat", method="sld", **options)
    assert de.get_erasures(sd_pipe) == [] and _hooks(sd_pipe) == 0


def test_guards_refuse_anchor_and_preserve(sd_pipe):
    for method in ("sld", "safree"):
        with pytest.raises(ValueError, match="no anchor"):
            de.erase_concept(sd_pipe, "a cat", method=method, anchor="a dog")
        with pytest.raises(ValueError, match="no preserve set"):
            de.erase_concept(sd_pipe, "a cat", method=method, preserve=["a dog"])
    assert de.get_erasures(sd_pipe) == []


# ------------------------------------------------------------------------------------------------ SAFREE


def _reference_filter(pipe, prompt, rows, keywords, alpha, up_t=10, center=5.333, slope=5.0):
    """The reference's per-prompt computation written out directly, for comparison."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(prompt)["input_ids"]
    n = len(ids) - 2
    masked = torch.tensor([ids[:i + 1] + [0] + ids[i + 2:] for i in range(n)])
    with torch.no_grad():
        m = encoder(masked)[0][:, -1]
        key_ids = tokenizer(keywords)["input_ids"]
        c = torch.stack([encoder(torch.tensor([k]))[0][0, -1] for k in key_ids])
    p_c = c.T.double() @ torch.linalg.pinv(c.double() @ c.T.double()) @ c.double()
    p_m = m.T.double() @ torch.linalg.pinv(m.double() @ m.T.double()) @ m.double()
    eye = torch.eye(p_c.shape[0], dtype=torch.float64)
    d = ((eye - p_c) @ m.T.double()).norm(dim=0)
    flagged = [bool(d[i] >= (1 + alpha) * (d.sum() - d[i]) / (n - 1)) for i in range(n)]
    x = rows.double()
    projected = ((eye - p_c) @ p_m @ x.T).T
    out = x.clone()
    for i, flag in enumerate(flagged):
        if flag:
            out[i + 1] = projected[i + 1]
    beta = 1 - torch.nn.functional.cosine_similarity(projected[: n + 2], x[: n + 2], dim=1).mean()
    last = round(up_t / (1 + np.exp(-slope * (10 * float(beta) - center))))
    return out.float(), last, flagged


def test_safree_filter_matches_the_reference_computation(sd_pipe):
    prompt, keywords = "a red cat on a mat", ["cat", "kitten"]
    rows = sd_pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]
    expected, last, flagged = _reference_filter(sd_pipe, prompt, rows, keywords, alpha=0.01)
    assert any(flagged) and not all(flagged)
    p_c = safree.projector(safree.pooled(sd_pipe, keywords))
    settings = {"alpha": 0.01, "self_validating": True, "up_t": 10, "svf_center": 5.333, "svf_slope": 5.0}
    filtered, found_last = safree.filter_prompt(sd_pipe, prompt, rows, p_c, settings)
    assert torch.allclose(filtered, expected, atol=1e-4) and found_last == last
    kept = [i + 1 for i, f in enumerate(flagged) if not f] + list(range(len(flagged) + 1, rows.shape[0]))
    assert torch.equal(filtered[kept], rows[kept])  # unflagged, end and padding rows untouched
    flagged_rows = filtered[[i + 1 for i, f in enumerate(flagged) if f]]
    assert (flagged_rows @ p_c).norm() < 1e-4 * max(1.0, rows.norm().item())  # nothing left along the keywords


def test_safree_uses_filtered_rows_for_steps_up_to_t_then_the_prompts_own(sd_pipe):
    record = de.erase_concept(sd_pipe, "cat", method="safree", up_t=10, svf_center=12.0)  # β < 1 ⇒ T small
    p_c = safree.projector(record.edit.tensors["keywords"])
    rows = sd_pipe.encode_prompt("a cat", "cpu", 1, False)[0][0]
    filtered, last = safree.filter_prompt(sd_pipe, "a cat", rows, p_c, record.edit.settings)
    assert last < 4
    seen = []
    handle = denoiser(sd_pipe).register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"][1].clone()), with_kwargs=True)
    _images(sd_pipe, ["a cat"], steps=5)
    handle.remove()
    for step, hidden in enumerate(seen):
        assert torch.allclose(hidden, filtered if step <= last else rows), step


def test_safree_leaves_a_prompt_without_trigger_tokens_bit_exact(sd_pipe):
    prompts = ["a cat", "a tree"]  # at α = 0.1 on this model "a cat" has a trigger token, "a tree" none
    settings = {"alpha": 0.1, "self_validating": False, "up_t": 10, "svf_center": 5.333, "svf_slope": 5.0}
    p_c = safree.projector(safree.pooled(sd_pipe, ["cat"]))
    found = [safree.filter_prompt(sd_pipe, p, sd_pipe.encode_prompt(p, "cpu", 1, False)[0][0], p_c, settings)
             for p in prompts]
    assert found[0] is not None and found[1] is None
    base = _images(sd_pipe, prompts)
    de.erase_concept(sd_pipe, "cat", method="safree", alpha=0.1, self_validating=False)
    guarded = _images(sd_pipe, prompts)
    assert not torch.equal(guarded[0], base[0]) and torch.equal(guarded[1], base[1])


def test_safree_filters_each_sample_of_a_batch_on_its_own(sd_pipe):
    de.erase_concept(sd_pipe, "cat", method="safree", self_validating=False)
    batch = _images(sd_pipe, ["a cat", "a tree"])
    assert torch.allclose(batch[0:1], _images(sd_pipe, ["a cat"]), atol=1e-5)
    assert torch.allclose(batch[1:], _images(sd_pipe, ["a tree"], seeds=[1]), atol=1e-5)


def test_safree_keywords_and_built_in_lists(sd_pipe):
    assert safree.keywords_for(["nudity"], None) == list(safree.NUDITY_KEYWORDS)
    assert safree.keywords_for(["Van Gogh", "starry night"], None) == ["Van Gogh", "starry night"]
    record = de.erase_concept(sd_pipe, ["cat", "kitten"], method="safree")
    assert record.edit.settings["keywords"] == ["cat", "kitten"]
    assert record.edit.tensors["keywords"].shape == (2, sd_pipe.text_encoder.config.hidden_size)
    with pytest.raises(ValueError, match="keywords is empty"):
        de.erase_concept(sd_pipe, "cat", method="safree", keywords=[" "])
    assert len(de.get_erasures(sd_pipe)) == 1


def test_safree_keyword_negative_prompt_replaces_only_the_default_negative(sd_pipe):
    de.erase_concept(sd_pipe, "cat", method="safree", keyword_negative_prompt=True, alpha=100.0)
    guarded = _images(sd_pipe, ["a tree"])
    own = _images(sd_pipe, ["a tree"], negative_prompt=["a dog"])
    de.unload_erasure(sd_pipe)
    assert torch.allclose(guarded, _images(sd_pipe, ["a tree"], negative_prompt=["cat"]), atol=1e-6)
    assert torch.equal(own, _images(sd_pipe, ["a tree"], negative_prompt=["a dog"]))  # the caller's wins


def test_saved_safree_guard_refuses_another_text_encoder(sd_pipe, tmp_path, tokenizer_dir):
    de.erase_concept(sd_pipe, "cat", method="safree")
    path = de.save_erasure_adapter(sd_pipe, tmp_path)
    other = make_sd_pipeline(tokenizer_dir, seed=1)
    with pytest.raises(ValueError, match="another text_encoder"):
        de.load_erasure_adapter(other, path)
    assert de.get_erasures(other) == [] and _hooks(other) == 0


# ------------------------------------------------------------------------------------------------ both


def test_guards_act_only_inside_pipeline_calls(sd_pipe, caplog):
    de.erase_concept(sd_pipe, "a cat", method="sld", sld_warmup_steps=0)
    unet = denoiser(sd_pipe)
    sample = torch.randn(2, 4, 8, 8)
    hidden = sd_pipe.encode_prompt("a cat", "cpu", 1, False)[0].expand(2, -1, -1)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = unet(sample, 10, encoder_hidden_states=hidden).sample  # training, attacks: no guard
    assert out.shape[0] == 2 and "acts only inside calls" in caplog.text
    de.unload_erasure(sd_pipe)
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, encoder_hidden_states=hidden).sample, out)


def test_guards_stack_with_weight_edits_and_membranes_and_unload_bit_exact(sd_pipe):
    before, base = snapshot(sd_pipe), _images(sd_pipe, ["a cat", "a tree"])
    de.erase_concept(sd_pipe, "a cat", method="uce")
    de.erase_concept(sd_pipe, "a cat", method="spm", iterations=2, lr=1e-2, max_denoising_steps=3, la_samples=1)
    de.erase_concept(sd_pipe, "cat", method="safree")
    de.erase_concept(sd_pipe, "a cat", method="sld", sld_warmup_steps=0)
    stacked = _images(sd_pipe, ["a cat", "a tree"])
    assert torch.isfinite(stacked).all() and not torch.equal(stacked, base)
    de.unload_erasure(sd_pipe)
    assert changed(before, snapshot(sd_pipe)) == [] and _hooks(sd_pipe) == 0
    assert torch.equal(_images(sd_pipe, ["a cat", "a tree"]), base)


def test_sld_keeps_membrane_gates_per_sample(sd_pipe):
    from diffusers_erase.state import get_module, state

    spm = de.erase_concept(sd_pipe, "a cat", method="spm", iterations=2, lr=1e-2, max_denoising_steps=3,
                           la_samples=1)
    de.erase_concept(sd_pipe, "a cat", method="sld", sld_warmup_steps=0)
    module = get_module(sd_pipe, next(iter(spm.edit.deltas)).rpartition(".")[0])
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape[0], state(sd_pipe).per_call.gates.clone())))
    _images(sd_pipe, ["a cat", "a tree"], steps=1)
    handle.remove()
    rows, gates = seen[0]
    assert rows == gates.shape[0] == 6  # [∅, ∅, cat, tree, S for cat, S for tree]
    assert torch.equal(gates[4:], gates[2:4]) and gates[2, 0] > gates[3, 0]  # each safety row: its prompt's gate


@pytest.mark.parametrize("method, options", [("sld", {"sld_warmup_steps": 0}), ("safree", {"self_validating": False})])
def test_guards_run_in_img2img_and_inpaint(sd_pipe, method, options):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    for cls, extra in [(StableDiffusionImg2ImgPipeline, {}), (StableDiffusionInpaintPipeline, {"mask_image": image})]:
        pipe = de.enable_erasure(cls(**sd_pipe.components))
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(image=image, steps=4, strength=0.75, height=32, width=32, **extra)
        base = _images(pipe, ["a cat"], **kwargs)
        pipe.erase_concept("a cat" if method == "sld" else "cat", method=method, **options)
        guarded = _images(pipe, ["a cat"], **kwargs)
        pipe.unload_erasure()
        assert torch.isfinite(guarded).all() and not torch.equal(guarded, base), cls.__name__
        assert torch.equal(_images(pipe, ["a cat"], **kwargs), base)


def test_guards_on_sdxl_use_the_pooled_embeddings(sdxl_pipe):
    base = _images(sdxl_pipe, ["a cat"], height=32, width=32)
    de.erase_concept(sdxl_pipe, "a cat", method="sld", sld_warmup_steps=0)
    de.erase_concept(sdxl_pipe, "cat", method="safree", keyword_negative_prompt=True)
    guarded = _images(sdxl_pipe, ["a cat"], height=32, width=32)
    assert torch.isfinite(guarded).all() and not torch.equal(guarded, base)
    de.unload_erasure(sdxl_pipe)
    assert torch.equal(_images(sdxl_pipe, ["a cat"], height=32, width=32), base)


def test_guards_refuse_a_pipeline_without_a_unet():
    class NotAPipeline:
        components = {}

    with pytest.raises(ValueError, match="Supported families"):
        de.erase_concept(NotAPipeline(), "a cat", method="sld")


def test_guards_act_in_a_pipeline_built_from_the_components(sd_pipe):
    from diffusers import StableDiffusionPipeline

    de.erase_concept(sd_pipe, "a cat", method="sld", sld_warmup_steps=0)  # sd_pipe itself is never called
    sibling = StableDiffusionPipeline(**sd_pipe.components)
    sibling.set_progress_bar_config(disable=True)
    de.enable_erasure(sibling)
    guarded, unguided = _images(sibling, ["a cat"]), _images(sibling, ["a cat"], guidance=1.0)
    de.unload_erasure(sibling)
    assert not torch.equal(guarded, _images(sibling, ["a cat"]))  # its own guidance flag, not sd_pipe's
    assert torch.equal(unguided, _images(sibling, ["a cat"], guidance=1.0))


def test_a_second_sld_guard_is_refused_and_the_first_kept(sd_pipe):
    de.erase_concept(sd_pipe, "a cat", method="sld")
    with pytest.raises(ValueError, match="one SLD guard"):
        de.erase_concept(sd_pipe, "a dog", method="sld")
    assert [e.concepts for e in de.get_erasures(sd_pipe)] == [["a cat"]] and _hooks(sd_pipe) == 3


def _denoiser_inputs(pipe, prompts, **kwargs) -> torch.Tensor:
    """The text rows the UNet reads at the first step (after every guard's pre-hook)."""
    seen = []
    handle = denoiser(pipe).register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    _images(pipe, prompts, steps=1, **kwargs)
    handle.remove()
    return seen[0]


def test_sld_encodes_its_safety_concept_as_the_call_encodes_the_prompt(sdxl_pipe):
    # (SDXL: diffusers' SD 1.x `clip_skip` path reads `text_encoder.text_model`, which transformers 5 removed)
    de.erase_concept(sdxl_pipe, "a cat", method="sld", sld_warmup_steps=0)
    rows = _denoiser_inputs(sdxl_pipe, ["a tree"], clip_skip=1, height=32, width=32)

    def encoded(**options):
        return sdxl_pipe.encode_prompt(prompt="a cat", device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False, **options)[0][0]

    assert torch.allclose(rows[2], encoded(clip_skip=1), atol=1e-6)
    assert not torch.allclose(encoded(clip_skip=1), encoded(), atol=1e-3)


def test_safree_swaps_only_the_prompt_half_of_the_guidance_batch(sd_pipe):
    record = de.erase_concept(sd_pipe, "cat", method="safree", self_validating=False)
    own = sd_pipe.encode_prompt("a cat", "cpu", 1, False)[0][0]
    filtered, _ = safree.filter_prompt(sd_pipe, "a cat", own, safree.projector(record.edit.tensors["keywords"]),
                                       record.edit.settings)
    rows = _denoiser_inputs(sd_pipe, ["a cat"], negative_prompt=["a cat"])  # the same text on both halves
    assert torch.equal(rows[0], own) and torch.allclose(rows[1], filtered)


def test_a_guard_on_a_family_it_does_not_declare_is_refused_and_nothing_attached(sd_pipe, monkeypatch):
    monkeypatch.setattr(safree.SafreeGuard, "families", ("sdxl",))
    with pytest.raises(ValueError, match=r"safree guard runs on the sdxl families, not 'sd1'"):
        de.erase_concept(sd_pipe, "cat", method="safree")
    assert de.get_erasures(sd_pipe) == [] and _hooks(sd_pipe) == 0
