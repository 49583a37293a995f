"""SPM membranes on tiny random pipelines: training, per-sample gating, combination, fusing, file formats and
bad input. Behaviour on the trained shapes model is in test_behaviour.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_load_fails_cleanly, changed, factors, make_sd_pipeline, membrane_of, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers_erase as de
from diffusers_erase.families import membrane_targets
from diffusers_erase.text import token_overlap, token_sets

TINY = dict(iterations=3, lr=1e-2, lr_warmup_steps=1, max_denoising_steps=3, la_samples=1)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return de.enable_erasure(pipe)


@pytest.fixture
def pipe(sd_pipe):
    return _quiet(sd_pipe)


def _images(pipe, prompts, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def _latents(pipe, prompts, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=2, generator=generator, output_type="latent", **kwargs).images


def test_training_is_deterministic_and_touches_no_weight(pipe, tokenizer_dir):
    before = snapshot(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    record = pipe.erase_concept("cat", method="spm", seed=3, **TINY)
    assert changed(before, snapshot(pipe)) == []  # a membrane runs beside the weights
    assert flags == [p.requires_grad for p in pipe.unet.parameters()]
    assert record.modules == [f"{n}.weight" for n in membrane_targets(pipe)] and record.rank == 1
    assert any(isinstance(m, torch.nn.Conv2d) for m in membrane_targets(pipe).values())  # proj_in/out
    assert membrane_of(record) == {"prompts": ["cat"], "gated": True, "weight": 1.0, "fused": False,
                                   "gate_power": 2.0}  # the reference's γ² by default
    assert any(up.abs().sum() > 0 for up, _ in factors(record).values())

    other = _quiet(make_sd_pipeline(tokenizer_dir))
    again = other.erase_concept("cat", method="spm", seed=3, **TINY)
    for name, (up, down) in factors(record).items():
        assert torch.equal(up, factors(again)[name][0]) and torch.equal(down, factors(again)[name][1]), name


def test_static_membrane_equals_its_fused_weights_and_membranes_add_as_products(pipe, tokenizer_dir):
    # Hooks (unfused) and fusing (W + w·up·down) are independent code paths; they agree only if the hooks add
    # Σ w_i up_i down_i, without the cross terms up_i down_j that summing factors would create.
    pipe.erase_concept("cat", method="spm", **TINY)
    pipe.erase_concept("dog", method="spm", adapter_name="dog", seed=1, **TINY)
    pipe.set_erasure_adapters(["default", "dog"], weights=[1.0, 0.8], gating=False)
    static = _latents(pipe, ["a cat", "a house"])
    pipe.fuse_erasure()
    assert pipe.unet._erasure_state.hooks == []
    fused = _latents(pipe, ["a cat", "a house"])
    assert (static - fused).abs().max() <= 1e-5 * static.abs().max()  # float round-off of two summation orders
    base = _quiet(make_sd_pipeline(tokenizer_dir))
    assert (_latents(base, ["a cat", "a house"]) - fused).abs().max() > 1e-3 * fused.abs().max()  # they did act


def test_each_sample_gets_its_own_gate_under_guidance(pipe):
    pipe.erase_concept("cat", method="spm", gate_power=1.0, **TINY)  # γ itself: the formula below
    expected = de.erasure_gates(pipe, ["", "blurry", "a cat", "a red house"])["default"]
    assert len(set(round(g, 4) for g in expected)) == 4
    # CFG batch: [negatives..., prompts...]. By default each sample's unconditional row carries its prompt's gate.
    _images(pipe, ["a cat", "a red house"], negative_prompt=["", "blurry"])
    gates = pipe.unet._erasure_state.per_call.gates[:, 0]  # this thread's last denoiser call
    assert torch.allclose(gates, torch.tensor(expected[2:] * 2), atol=1e-5)
    # unconditional_gate="negative_prompt": every row is gated by its own (negative) prompt.
    pipe.set_erasure_adapters("default", unconditional_gate="negative_prompt")
    _images(pipe, ["a cat", "a red house"], negative_prompt=["", "blurry"])
    gates = pipe.unet._erasure_state.per_call.gates[:, 0]  # this thread's last denoiser call
    assert torch.allclose(gates, torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError, match="unconditional_gate"):
        pipe.set_erasure_adapters("default", unconditional_gate="uncond")

    # The gate is the paper's: max(cos of the flattened embeddings, share of the erased prompt's tokens).
    from diffusers_erase.text import encode

    emb = encode(pipe, ["a red house", "cat"], full_length=True).flatten(1)
    cosine = float(F.cosine_similarity(emb[0], emb[1], dim=0))
    prompt_tokens, erased_tokens = token_sets(pipe, ["a red house", "cat"])
    assert expected[3] == pytest.approx(min(1.0, max(cosine, token_overlap(prompt_tokens, erased_tokens))), abs=1e-5)
    assert de.erasure_gates(pipe, ["cat"])["default"] == [pytest.approx(1.0, abs=1e-5)]


def test_gated_membrane_acts_less_than_static_one(pipe, tokenizer_dir):
    base = _latents(_quiet(make_sd_pipeline(tokenizer_dir)), ["a red house"])
    pipe.erase_concept("cat", method="spm", **TINY)
    gated = _latents(pipe, ["a red house"])
    gate = de.erasure_gates(pipe, ["a red house"])["default"][0]
    pipe.set_erasure_adapters("default", gating=False)
    static = _latents(pipe, ["a red house"])
    assert gate < 1.0
    assert F.mse_loss(gated, base) < F.mse_loss(static, base)


def test_weights_zero_switches_a_membrane_off_and_unload_is_bit_exact(pipe, tokenizer_dir):
    base = _images(_quiet(make_sd_pipeline(tokenizer_dir)), ["a cat"])
    before = snapshot(pipe)
    pipe.erase_concept("cat", method="spm", **TINY)
    assert not (_images(pipe, ["a cat"]) == base).all()
    pipe.set_erasure_adapters(["default"], weights=[0.0])
    assert (_images(pipe, ["a cat"]) == base).all()
    pipe.set_erasure_adapters(["default"], weights=[1.0])
    pipe.unload_erasure()
    assert changed(before, snapshot(pipe)) == [] and pipe.unet._erasure_state.hooks == []
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    assert (_images(pipe, ["a cat"]) == base).all()


def test_save_load_round_trip_and_transfer_to_another_pipeline(pipe, tokenizer_dir, tmp_path):
    pipe.erase_concept("cat", method="spm", **TINY)
    expected = _images(pipe, ["a cat", "a dog"])
    path = pipe.save_erasure_adapter(tmp_path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["diffusers_erase"])
    assert header["erasures"][0]["membrane"]["prompts"] == ["cat"]

    other = _quiet(make_sd_pipeline(tokenizer_dir))
    loaded = other.load_erasure_adapter(tmp_path, adapter_name="cat")
    assert membrane_of(loaded[0])["gated"] and loaded[0].name == "cat"
    assert (_images(other, ["a cat", "a dog"]) == expected).all()

    # A second membrane combines with the first; weights choose their strengths.
    other.erase_concept("dog", method="spm", adapter_name="dog", **TINY)
    other.set_erasure_adapters(["cat", "dog"], weights=[1.0, 0.5])
    assert [membrane_of(e)["weight"] for e in other.erasures] == [1.0, 0.5]
    other.set_erasure_adapters(["dog"])
    assert [membrane_of(e)["weight"] for e in other.erasures] == [0.0, 1.0]


def _reference_spm_file(record, path, prompts="cat", alpha=1.0, drop=None, metadata=None):
    """A membrane written as the SPM reference code writes its files: kohya keys, alpha, prompts/rank/alpha."""
    tensors = {}
    for name, (up, down) in factors(record).items():
        if drop and drop in name:
            continue
        key = "lora_unet_" + name[len("unet."):].replace(".", "_")
        rank = down.shape[0]
        # The reference stores up unscaled and applies alpha / rank at run time.
        tensors[f"{key}.lora_up.weight"] = (up * rank / alpha).half()
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
    save_file(tensors, str(path), metadata=metadata if metadata is not None
              else {"prompts": prompts, "rank": "1", "alpha": str(alpha)})
    return path


def test_reference_format_spm_loads_and_gates(pipe, tokenizer_dir, tmp_path):
    record = pipe.erase_concept("cat", method="spm", **TINY)
    pipe.unload_erasure()
    # Conv2d modules (proj_in/out) store 4-D factors in such files.
    file = _reference_spm_file(record, tmp_path / "cat_last.safetensors", alpha=2.0)
    other = _quiet(make_sd_pipeline(tokenizer_dir))
    loaded = other.load_erasure_adapter(file)
    assert loaded[0].method == "spm" and membrane_of(loaded[0])["prompts"] == ["cat"]
    assert other.erasure_gates(["cat", "a red house"])["default"][0] == pytest.approx(1.0, abs=1e-5)
    for name, (up, down) in factors(loaded[0]).items():  # fp16 round trip of the factors
        assert torch.allclose(up @ down, factors(record)[name][0] @ factors(record)[name][1], atol=1e-3), name

    # Our kohya export of the membrane carries the reference's metadata fields too.
    out = de.export_adapter(other, tmp_path / "export.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["prompts"] == "cat" and meta["rank"] == "1"
    third = _quiet(make_sd_pipeline(tokenizer_dir))
    third.load_erasure_adapter(out)
    assert (_images(third, ["a cat"]) == _images(other, ["a cat"])).all()


def test_bad_membrane_input(pipe, tokenizer_dir, sdxl_pipe, tmp_path):
    record = pipe.erase_concept("cat", method="spm", **TINY)
    pipe.unload_erasure()
    fresh = _quiet(make_sd_pipeline(tokenizer_dir))
    # No prompts metadata: not gateable, and not a K/V edit either.
    no_prompts = _reference_spm_file(record, tmp_path / "a.safetensors", metadata={})
    assert_load_fails_cleanly(fresh, no_prompts, r"no `prompts` metadata")
    # Missing modules are fine (a partial membrane); a mismatched shape is not.
    tensors = load_file(str(_reference_spm_file(record, tmp_path / "b.safetensors")))
    key = next(k for k in tensors if k.endswith("attn2_to_k.lora_down.weight"))
    tensors[key] = torch.zeros(1, 7)
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"prompts": "cat", "rank": "1", "alpha": "1"})
    assert_load_fails_cleanly(fresh, tmp_path / "c.safetensors",
                              r"do not fit unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k")
    # A membrane for another family.
    sdxl_meta = {"prompts": "cat", "rank": "1", "alpha": "1", "ss_base_model_version": "sdxl_base_v1-0"}
    _reference_spm_file(record, tmp_path / "d.safetensors", metadata=sdxl_meta)
    assert_load_fails_cleanly(fresh, tmp_path / "d.safetensors", r"for 'sdxl'")
    # Weights of the wrong length, unknown names, nothing to fuse.
    fresh.load_erasure_adapter(_reference_spm_file(record, tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="one weight per name"):
        fresh.set_erasure_adapters(["default"], weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="No membrane named 'mickey'"):
        fresh.set_erasure_adapters(["mickey"])
    assert membrane_of(fresh.erasures[0])["weight"] == 1.0
    # SPM options are checked; preserve sets are refused before any work.
    with pytest.raises(ValueError, match="max_denoising_steps"):
        de.SPMConfig(max_denoising_steps=1)
    with pytest.raises(ValueError, match="no preserve set"):
        fresh.erase_concept("dog", method="spm", preserve=["cow"], **TINY)
    assert len(fresh.erasures) == 1


def test_membrane_and_weight_edits_stack_and_unload_together(pipe):
    before = snapshot(pipe)
    pipe.erase_concept("cat", method="uce", adapter_name="uce-cat")
    pipe.erase_concept("dog", method="spm", **TINY)
    with pytest.raises(ValueError, match="weight edit"):
        pipe.set_erasure_adapters(["uce-cat"])
    pipe.unload_erasure()
    assert changed(before, snapshot(pipe)) == []


def test_tiny_budget_takes_overrides():
    tiny = de.SPMConfig.tiny(la_strength=5.0, iterations=7)
    assert (tiny.la_strength, tiny.iterations, tiny.lr) == (5.0, 7, de.SPMConfig.tiny().lr)
    assert de.SPMConfig().la_strength == 1000.0  # the paper's default stays the default


def test_membranes_refuse_fused_projections(pipe, tokenizer_dir):
    """A membrane's hooks sit on to_q/to_k/to_v; fused projections (to_qkv/to_kv) would bypass them."""
    fused = _quiet(make_sd_pipeline(tokenizer_dir))
    fused.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        fused.erase_concept("cat", method="spm", **TINY)
    pipe.erase_concept("cat", method="spm", **TINY)
    pipe.fuse_qkv_projections()  # after loading: the next call is refused, not run without the membrane
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        _images(pipe, ["a cat"])
    pipe.unfuse_qkv_projections()
    _images(pipe, ["a cat"])
