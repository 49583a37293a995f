"""Bad input gets a clear error that names the fix, and changes nothing."""

import pytest
import torch
from conftest import REFERENCE_UCE, changed, snapshot
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import diffusers_erase as de
from diffusers_erase import deltas as deltas_module
from diffusers_erase import state as state_module


def _fails_cleanly(pipe, error, match, *args, **kwargs):
    before = snapshot(pipe)
    with pytest.raises(error, match=match):
        de.erase_concept(pipe, *args, **kwargs)
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []


def test_unknown_method_lists_the_available_ones(sd_pipe):
    # (the contract matrix's test-only `scale_guard` is registered while the tests run)
    listed = (r"Unknown erasure method 'ucee'. Available methods: advunlearn, esd, fewshot, mace, rece, "
              r"safree, (scale_guard, )?sld, speed, spm, uce")
    _fails_cleanly(sd_pipe, ValueError, listed, "cat", method="ucee")


def test_unknown_option_lists_the_valid_ones(sd_pipe):
    _fails_cleanly(sd_pipe, TypeError, r"Unknown option\(s\) \['lambda'\].*lamb, erase_scale", "cat", **{"lambda": 1})


@pytest.mark.parametrize("options,match", [
    ({"lamb": -1.0}, "lamb must be a number ≥ 0"),
    ({"erase_scale": 0.0}, "erase_scale must be > 0"),
    ({"token_policy": "first"}, "Unknown token_policy 'first'; choose one of last_subject, subject, eot, tail, all"),
])
def test_invalid_option_values(sd_pipe, options, match):
    _fails_cleanly(sd_pipe, ValueError, match, "cat", **options)


@pytest.mark.parametrize("concepts", ["", "   ", [], ["cat", " "]])
def test_empty_concepts(sd_pipe, concepts):
    _fails_cleanly(sd_pipe, ValueError, "non-empty text|at least one concept", concepts)


def test_concept_longer_than_the_text_encoder_reads(sd_pipe):
    _fails_cleanly(sd_pipe, ValueError, r"is \d+ tokens long; the text encoder reads at most 75", "x" * 80)


def test_long_preserved_prompt(sd_pipe):
    _fails_cleanly(sd_pipe, ValueError, "preserved prompt", "cat", preserve=["y" * 90])


def test_concept_also_preserved(sd_pipe):
    _fails_cleanly(sd_pipe, ValueError, r"\['Cat'\] are both erased and preserved", "Cat", preserve=["dog", "cat "])


def test_anchor_count_must_match(sd_pipe):
    _fails_cleanly(sd_pipe, ValueError, "one anchor, or one per concept", ["cat", "dog", "tree"], anchor=["a", "b"])


def test_pipeline_without_cross_attention_names_supported_families():
    unet = UNet2DModel(block_out_channels=(4, 8), norm_num_groups=2, sample_size=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="has no UNet cross-attention.*Supported families: Stable Diffusion 1.x/2.x"):
        de.erase_concept(pipe, "cat")


def test_ill_conditioned_solve_is_detected(sd_pipe):
    # one column each (the corpus prior, or the tail's padding columns, would make the system well posed)
    _fails_cleanly(sd_pipe, FloatingPointError, "larger `lamb`", ["cat", "cat"], lamb=0.0, **REFERENCE_UCE)


def test_a_failure_on_the_last_layer_leaves_every_weight_as_it_was(sd_pipe, monkeypatch):
    de.erase_concept(sd_pipe, "tree")  # a first erasure, so the rollback must restore edited (not original) weights
    before, erasures = snapshot(sd_pipe), de.get_erasures(sd_pipe)
    original_edit = deltas_module.LowRank.apply_
    calls = []

    def failing_on_last(self, weight, scale=1.0, what="edit"):
        calls.append(1)
        if len(calls) == 8:  # the tiny UNet has 8 cross-attention projections
            raise RuntimeError("injected failure")
        original_edit(self, weight, scale, what)

    monkeypatch.setattr(deltas_module.LowRank, "apply_", failing_on_last)
    with pytest.raises(RuntimeError, match="injected"):
        de.erase_concept(sd_pipe, "cat")
    assert len(calls) == 8
    assert changed(before, snapshot(sd_pipe)) == [] and de.get_erasures(sd_pipe) == erasures
    monkeypatch.setattr(deltas_module.LowRank, "apply_", original_edit)
    de.unload_erasure(sd_pipe)  # the stash of originals is intact too
    de.erase_concept(sd_pipe, "cat")


def test_non_finite_factors_are_refused_and_nothing_stays_stashed(sd_pipe):
    from diffusers_erase.api import adapter_state_dict

    de.erase_concept(sd_pipe, "cat")
    tensors, metadata = adapter_state_dict(sd_pipe)
    de.unload_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last] * torch.inf
    with pytest.raises(ValueError, match=f"tensor {last} holds NaN or infinite values"):
        de.load_erasure_adapter(sd_pipe, tensors, metadata=metadata)
    assert changed(before, snapshot(sd_pipe)) == [] and state_module.state(sd_pipe).originals == {}
    # Finite factors whose sum with the weights overflows are refused when they are applied.
    tensors = {k: torch.full_like(v, 1e36) for k, v in tensors.items()}
    with pytest.raises(FloatingPointError, match="beyond ±65504"):
        de.load_erasure_adapter(sd_pipe, tensors, metadata=metadata)
    assert changed(before, snapshot(sd_pipe)) == [] and state_module.state(sd_pipe).originals == {}


def test_fused_projections_are_refused(sd_pipe):
    sd_pipe.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        de.erase_concept(sd_pipe, "cat")


def test_unfused_projections_can_be_erased_again(sd_pipe):
    """diffusers' unfuse restores the processors but leaves `fused_projections` set: the processor decides."""
    sd_pipe.fuse_qkv_projections()
    sd_pipe.unfuse_qkv_projections()
    de.erase_concept(sd_pipe, "cat")
    assert len(de.get_erasures(sd_pipe)) == 1
