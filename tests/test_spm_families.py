"""SPM beyond SD 1.x/2.x: training on SDXL, SD3 and FLUX through one family-aware denoiser (methods/_denoising.py),
membranes on the MMDiT text stream only, and per-prompt gating under FLUX's true CFG. The contract matrix
(test_contract.py) runs every structural check for these rows; here: that x_t is the pipeline's own trajectory,
that the anchors carry the pooled vector, and that both branches of a guided FLUX step share one gate."""

import pytest
import torch
from conftest import CALL_SIZE, FLUX_ERASE, make_flux_pipeline, make_sd3_pipeline, make_sdxl_pipeline

import diffusers_erase as de
from diffusers_erase.families import membrane_targets
from diffusers_erase.methods._denoising import Denoiser, encode_condition
from diffusers_erase.methods.spm import SPMConfig, _anchors
from diffusers_erase.state import state

FACTORIES = {"sdxl": make_sdxl_pipeline, "sd3": make_sd3_pipeline, "flux": make_flux_pipeline}
SIZE = 16
SPM_TINY = dict(iterations=2, lr=1e-2, max_denoising_steps=3, la_samples=1, resolution=SIZE)


def _pipe(name, tokenizer_dir):
    pipe = FACTORIES[name](tokenizer_dir)
    if name == "sdxl":  # SPM draws x_t with DDIM, as its reference; give the pipeline the same sampler
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_mmdit_membranes_adapt_only_the_layers_that_read_the_text_stream(tokenizer_dir):
    for name in ("flux", "sd3"):
        pipe = _pipe(name, tokenizer_dir)
        joint = len(pipe.transformer.transformer_blocks)
        expected = ["transformer.context_embedder"] + [
            f"transformer.transformer_blocks.{i}.attn.{p}" for i in range(joint) for p in ("add_k_proj", "add_v_proj")]
        assert list(membrane_targets(pipe)) == expected, name


def test_a_fused_flux_transformer_is_refused_with_the_fix(tokenizer_dir):
    pipe = _pipe("flux", tokenizer_dir)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        de.erase_concept(pipe, "cat", method="spm", **SPM_TINY, **FLUX_ERASE)
    assert de.get_erasures(pipe) == []


@pytest.mark.parametrize("name", list(FACTORIES))
def test_x_t_is_the_pipelines_own_trajectory(name, tokenizer_dir):
    """k sampler steps of `Denoiser.partial` from the pipeline's initial noise reach the latents the pipeline itself
    has after k steps with the same guidance and negative prompt: the conditioning (tokens, pooled vector, SDXL's
    time ids, FLUX's packing and ids), the timesteps and the guidance are the pipeline's."""
    pipe, steps, k, guidance = _pipe(name, tokenizer_dir), 4, 3, 3.0
    seen = {}

    def keep(pipe_, i, t, tensors):
        seen[i] = tensors["latents"].clone()
        return {}

    # The tiny FLUX is guidance-distilled (FLUX.1-dev): guidance through its embedding, no negative branch.
    options = {} if name == "flux" else dict(negative_prompt="")
    with torch.no_grad():
        pipe("a cat", num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=keep,
             **{**CALL_SIZE.get(type(pipe).__name__, {"height": SIZE, "width": SIZE}), **options})
    model = Denoiser(pipe, SIZE, steps)
    with de.families.max_sequence_length(CALL_SIZE.get(type(pipe).__name__, {}).get("max_sequence_length")):
        table = encode_condition(pipe, ["", "a cat"])
    x_t = model.partial(model.noise(torch.Generator().manual_seed(0)), k, table.rows(slice(0, 1)),
                        table.rows(slice(1, 2)), guidance)
    assert torch.allclose(x_t, seen[k - 1], atol=1e-4), float((x_t - seen[k - 1]).abs().max())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_anchors_carry_a_pooled_vector_drawn_like_the_tokens(name, tokenizer_dir):
    pipe = _pipe(name, tokenizer_dir)
    with de.families.max_sequence_length(64):
        table = encode_condition(pipe, ["", "a cat"])
    uncond, target = table.rows(slice(0, 1)), table.rows(slice(1, 2))
    config = SPMConfig(la_samples=2)
    anchors = _anchors(target, uncond, config, torch.Generator().manual_seed(0))
    assert anchors.tokens.shape == (2, *target.tokens.shape[1:])
    assert anchors.pooled.shape == (2, target.pooled.shape[1])
    # the reference's interleaving [∅, s1, ∅, s2] keeps its second half: ∅ then s2
    assert torch.equal(anchors.pooled[0], uncond.pooled[0]) and not torch.equal(anchors.pooled[1], uncond.pooled[0])
    norm = target.pooled.norm()
    assert 0.8 * norm <= anchors.pooled[1].norm() <= 1.2 * norm


def _gates_per_call(pipe):
    """The membrane strengths each transformer call ran with (None: no membrane acted)."""
    seen = []

    def hook(module, args, kwargs):
        gates = getattr(state(pipe).per_call, "gates", None)
        seen.append(None if gates is None else gates.clone())

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_flux_true_cfg_runs_the_negative_branch_with_the_prompts_gate(tokenizer_dir):
    """FLUX runs the negative prompt as a transformer call of its own; it takes the gate of the prompt's call before
    it (as the batched SD pipelines pair rows), or its own with unconditional_gate="negative_prompt"."""
    pipe = _pipe("flux", tokenizer_dir)
    de.erase_concept(pipe, "cat", method="spm", **SPM_TINY, **FLUX_ERASE)
    seen, handle = _gates_per_call(pipe)
    call = dict(negative_prompt="", true_cfg_scale=2.0, num_inference_steps=2, output_type="latent",
                **CALL_SIZE["FluxPipeline"])
    try:
        pipe("a cat", **call)
        paired = list(seen)
        seen.clear()
        de.set_erasure_adapters(pipe, "default", unconditional_gate="negative_prompt")
        pipe("a cat", **call)
    finally:
        handle.remove()
    assert len(paired) == 4  # 2 steps × (prompt, negative prompt)
    for prompt_gates, negative_gates in zip(paired[::2], paired[1::2]):
        assert float(prompt_gates[0, 0]) == pytest.approx(1.0)  # the concept's own tokens open the gate fully
        assert torch.equal(negative_gates, prompt_gates)
    own = seen[1]
    assert own is None or float(own.max()) < 1.0  # "" has no tokens: its own gate is the cosine term only


def test_a_flux_membrane_exports_as_a_diffusers_lora_and_refuses_kohya_with_the_fix(tokenizer_dir, tmp_path):
    from safetensors import safe_open

    pipe = _pipe("flux", tokenizer_dir)
    de.erase_concept(pipe, "cat", method="spm", **SPM_TINY, **FLUX_ERASE)
    with pytest.raises(ValueError, match="add_k_proj has no kohya name.*format='lora'"):
        de.export_adapter(pipe, tmp_path / "kohya.safetensors", format="kohya")
    assert not (tmp_path / "kohya.safetensors").exists()
    path = de.export_adapter(pipe, tmp_path / "lora.safetensors", format="lora")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    assert not any("single_transformer_blocks" in k for k in keys)


def test_flux_gates_are_scored_at_the_length_the_membrane_was_made_for(tokenizer_dir):
    """The cosine term compares whole padded T5 sequences: the gate's own embeddings and the scored prompts are
    encoded at the membrane's `max_sequence_length`, not the tokenizer's default."""
    pipe = _pipe("flux", tokenizer_dir)
    de.erase_concept(pipe, "cat", method="spm", **SPM_TINY, **FLUX_ERASE)
    own, other = de.erasure_gates(pipe, ["a cat", "a red house"])["default"]
    assert own == pytest.approx(1.0)
    assert 0.0 < other < 1.0  # a cosine term (0 if the lengths differed), below the concept's own gate
