"""FLUX and SD3 (MMDiT): the family rows, encoding exactly as each pipeline's `encode_prompt`, the closed forms
on `context_embedder` and the pooled embedder, and the refusals. Tiny pipelines built in code (conftest)."""

import logging
import types

import pytest
import torch
from conftest import (
    FLUX_ERASE,
    assert_load_fails_cleanly,
    call_kwargs,
    changed,
    make_flux_pipeline,
    make_sd3_pipeline,
    snapshot,
)

import diffusers_erase as de
from diffusers_erase.families import family_of, max_sequence_length, pooled_readers, text_readers
from diffusers_erase.methods.rece import adversarial_solve, projection_gram
from diffusers_erase.methods.uce import closed_form_edit
from diffusers_erase.text import (
    aligned_positions,
    concept_anchor_columns,
    encode_pooled,
    prompt_columns,
    segment_lengths,
    token_lengths,
)

LENGTH = FLUX_ERASE["max_sequence_length"]
NO_CORPUS = {"preserve_corpus": None, **FLUX_ERASE}


@pytest.fixture
def flux_pipe(tokenizer_dir):
    return make_flux_pipeline(tokenizer_dir)


@pytest.fixture(params=["flux", "sd3"])
def mmdit_pipe(request, tokenizer_dir):
    return (make_flux_pipeline if request.param == "flux" else make_sd3_pipeline)(tokenizer_dir)


def _encode_prompt(pipe, prompts):
    """(token embeddings, pooled vectors) as the pipeline's own `encode_prompt` gives them to the transformer."""
    if type(pipe).__name__ == "FluxPipeline":
        tokens, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=LENGTH)
    else:
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=LENGTH)
    return tokens, pooled


def test_flux_is_its_own_family_with_both_text_pathways(flux_pipe):
    assert family_of(flux_pipe).name == "flux"
    assert list(text_readers(flux_pipe)) == ["transformer.context_embedder"]
    assert list(pooled_readers(flux_pipe)) == ["transformer.time_text_embed.text_embedder.linear_1"]
    pipe = de.enable_erasure(flux_pipe)
    assert type(pipe).__name__ == "FluxPipeline" and hasattr(pipe, "erase_concept")


def test_sd3_is_its_own_family_and_an_unknown_transformer_is_refused(tokenizer_dir):
    pipe = make_sd3_pipeline(tokenizer_dir)
    assert family_of(pipe).name == "sd3" and list(text_readers(pipe)) == ["transformer.context_embedder"]
    fake = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2), unet=None)
    with pytest.raises(ValueError, match="Linear, which diffusers-erase does not edit yet.*Supported families"):
        family_of(fake)


@pytest.mark.parametrize("policy", de.TOKEN_POLICIES)
def test_token_columns_are_those_encode_prompt_gives_the_transformer(mmdit_pipe, policy):
    prompt = "a photo of a cat"
    reference = _encode_prompt(mmdit_pipe, prompt)[0][0]
    with max_sequence_length(LENGTH):
        n = token_lengths(mmdit_pipe, [prompt])[0]
        columns = prompt_columns(mmdit_pipe, [prompt], policy)
        counts = [c[0] for _, c in segment_lengths(mmdit_pipe, [prompt], [n])]
    # SD3: 77 CLIP positions, then the T5 ones; FLUX: T5 only. T5 has no start token: "subject" starts at 0 there,
    # the last word is still n − 2 and the end token n − 1.
    sizes = [77, LENGTH] if len(counts) == 2 else [LENGTH]
    assert reference.shape[0] == sum(sizes)
    expected, start = [], 0
    for size, n, lead in zip(sizes, counts, [1, 0] if len(counts) == 2 else [0]):
        part = reference[start: start + size]
        start += size
        expected.append({"last_subject": part[n - 2: n - 1], "eot": part[n - 1: n], "tail": part[n - 2:],
                         "all": part, "aligned": part, "subject": part[lead: n - 1]}[policy])
    assert torch.allclose(columns, torch.cat(expected), atol=1e-5)


def test_pooled_vectors_are_those_encode_prompt_gives_the_transformer(mmdit_pipe):
    prompts = ["a photo of a cat", ""]
    assert torch.allclose(encode_pooled(mmdit_pipe, prompts), _encode_prompt(mmdit_pipe, prompts)[1], atol=1e-5)


def test_padding_length_changes_every_t5_column(flux_pipe):
    # T5 is unmasked and bidirectional: the padding is read, so the length an erasure is made for matters.
    with max_sequence_length(LENGTH):
        short = prompt_columns(flux_pipe, ["a cat"], "last_subject")
    with max_sequence_length(2 * LENGTH):
        long = prompt_columns(flux_pipe, ["a cat"], "last_subject")
    assert not torch.allclose(short, long, atol=1e-4)


def test_aligned_positions_pair_the_shared_start_end_and_padding():
    # concept: [a, photo, of, c1, c2, EOS] ; anchor: [a, photo, of, d, EOS]; 8 positions in all.
    concept, anchor = [5, 6, 7, 10, 11, 1], [5, 6, 7, 20, 1]
    c_pos, a_pos = aligned_positions(concept, anchor, 8)
    assert c_pos == [0, 1, 2, 3, 4, 5, 6, 7]
    assert a_pos == [0, 1, 2, 3, 3, 4, 5, 6]  # both concept tokens go to the anchor's one; EOS and padding in order
    c_pos, a_pos = aligned_positions([5, 6, 7, 10, 1], [5, 6, 7, 1], 6)  # empty anchor word: the next position
    assert list(zip(c_pos, a_pos)) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 3), (5, 4)]


def test_aligned_columns_of_a_concept_and_its_anchor_line_up(flux_pipe):
    with max_sequence_length(LENGTH):
        erase, target = concept_anchor_columns(flux_pipe, ["photo of cat"], ["photo of dog"], "aligned")
        rows = prompt_columns(flux_pipe, ["photo of cat", "photo of dog"], "all")
    assert erase.shape == target.shape == (LENGTH, 32)
    assert torch.allclose(erase, rows[:LENGTH]) and torch.allclose(target, rows[LENGTH:])


def test_uce_sends_the_concept_to_the_anchor_output_with_the_bias_counted_once(mmdit_pipe):
    # λ → 0, one column per pathway and segment: the edited layer must give the concept's keys the anchor's
    # outputs, bias included once (the reference's FLUX script fits W c_a + b and then adds b again).
    embedder = mmdit_pipe.transformer.context_embedder
    pooled_layer = mmdit_pipe.transformer.time_text_embed.text_embedder.linear_1
    assert embedder.bias is not None and embedder.bias.abs().max() > 0
    options = dict(lamb=1e-6, token_policy="last_subject", **NO_CORPUS)
    with max_sequence_length(LENGTH), torch.no_grad():
        c_e, c_a = concept_anchor_columns(mmdit_pipe, ["cat"], ["dog"], "last_subject")
        p_e, p_a = encode_pooled(mmdit_pipe, ["cat"]), encode_pooled(mmdit_pipe, ["dog"])
        wanted, wanted_pooled = embedder(c_a), pooled_layer(p_a)
    de.erase_concept(mmdit_pipe, "cat", anchor="dog", **options)
    with torch.no_grad():
        assert torch.allclose(embedder(c_e), wanted, atol=1e-3)
        assert torch.allclose(pooled_layer(p_e), wanted_pooled, atol=1e-3)


def test_uce_keeps_preserved_prompts_in_both_pathways(mmdit_pipe):
    embedder = mmdit_pipe.transformer.context_embedder
    pooled_layer = mmdit_pipe.transformer.time_text_embed.text_embedder.linear_1
    with max_sequence_length(LENGTH), torch.no_grad():
        kept = prompt_columns(mmdit_pipe, ["a dog"], "all")
        kept_pooled = encode_pooled(mmdit_pipe, ["a dog"])
        before, before_pooled = embedder(kept), pooled_layer(kept_pooled)
        moved = prompt_columns(mmdit_pipe, ["a cat"], "all")
        moved_before = embedder(moved)
    de.erase_concept(mmdit_pipe, "a cat", preserve=["a dog"], preserve_scale=1e4, token_policy="last_subject",
                     **NO_CORPUS)
    with torch.no_grad():
        # 10× less movement than the erased prompt (without the preserve term the two move alike)
        assert (embedder(kept) - before).norm() < 0.1 * (embedder(moved) - moved_before).norm()
        assert torch.allclose(pooled_layer(kept_pooled), before_pooled, atol=1e-2)


def test_rece_adversarial_embedding_of_the_context_embedder_matches_a_numeric_optimum(mmdit_pipe):
    # FLUX and SD3: one layer reads the tokens, so c_adv = argmin ‖W T x − W c‖² + λ_reg ‖x‖² is a single solve.
    torch.manual_seed(0)
    weight = mmdit_pipe.transformer.context_embedder.weight.detach().double()
    with max_sequence_length(LENGTH):
        c_e, c_a = concept_anchor_columns(mmdit_pipe, ["cat"], [""], "last_subject")
    p, q = closed_form_edit(c_e, c_a, None, lamb=0.1, erase_scale=1.0, preserve_scale=0.0)
    reg = 0.1
    closed = adversarial_solve(projection_gram(mmdit_pipe).double(), p, q, reg, c_e.double().T).T[0]
    t = torch.eye(weight.shape[1], dtype=torch.float64) + p @ q
    x = torch.zeros(weight.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([x], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    target = weight @ c_e.double()[0]

    def loss():
        optimiser.zero_grad()
        value = (weight @ (t @ x) - target).pow(2).sum() + reg * x.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    assert torch.allclose(closed, x.detach(), atol=1e-5 * closed.norm().item())


def test_max_sequence_length_is_recorded_and_a_call_with_another_warns(flux_pipe, caplog):
    pipe = de.enable_erasure(flux_pipe)
    record = pipe.erase_concept("cat", **NO_CORPUS)
    assert record.options["max_sequence_length"] == LENGTH
    kwargs = dict(num_inference_steps=1, output_type="np", **call_kwargs(pipe))
    with caplog.at_level(logging.WARNING, logger="diffusers_erase.runtime"):
        pipe("a cat", **kwargs)
        assert "max_sequence_length" not in caplog.text
        pipe("a cat", **{**kwargs, "max_sequence_length": 2 * LENGTH})
    assert f"max_sequence_length={2 * LENGTH}" in caplog.text and f"[{LENGTH}]" in caplog.text


def test_max_sequence_length_is_refused_where_there_is_no_t5(sd_pipe):
    with pytest.raises(ValueError, match="max_sequence_length applies to FLUX"):
        de.erase_concept(sd_pipe, "cat", max_sequence_length=64)
    assert de.get_erasures(sd_pipe) == []


def test_flux_and_unet_adapters_do_not_cross(flux_pipe, sd_pipe, tokenizer_dir, tmp_path):
    de.erase_concept(flux_pipe, "cat", **NO_CORPUS)
    flux_file = de.save_erasure_adapter(flux_pipe, tmp_path / "flux")
    assert_load_fails_cleanly(sd_pipe, flux_file, "made for a 'flux' pipeline, but this is a 'sd1'")
    de.erase_concept(sd_pipe, "cat", preserve_corpus=None)
    sd_file = de.save_erasure_adapter(sd_pipe, tmp_path / "sd")
    fresh = type(flux_pipe)(**flux_pipe.components)
    de.unload_erasure(fresh)
    assert_load_fails_cleanly(fresh, sd_file, "made for a 'sd1' pipeline, but this is a 'flux'")
    assert_load_fails_cleanly(make_sd3_pipeline(tokenizer_dir), flux_file,
                              "made for a 'flux' pipeline, but this is a 'sd3'")


def test_a_wrapped_context_embedder_is_refused_with_the_fix(flux_pipe):
    class Wrapped(torch.nn.Linear):  # what a quantised or LoRA-wrapped layer looks like to us
        pass

    original = flux_pipe.transformer.context_embedder
    wrapped = Wrapped(original.in_features, original.out_features)
    wrapped.load_state_dict(original.state_dict())
    flux_pipe.transformer.context_embedder = wrapped
    before = snapshot(flux_pipe)
    with pytest.raises(ValueError, match="quantised, fused or has a LoRA.*unquantised"):
        de.erase_concept(flux_pipe, "cat", **NO_CORPUS)
    assert changed(before, snapshot(flux_pipe)) == [] and de.get_erasures(flux_pipe) == []


@pytest.mark.parametrize("method", ["esd", "mace", "advunlearn", "speed"])
def test_methods_not_built_for_flux_say_so_and_change_nothing(flux_pipe, method):
    before = snapshot(flux_pipe)
    with pytest.raises(ValueError, match=f"The {method} method runs on .* pipelines, not 'flux'"):
        de.erase_concept(flux_pipe, "cat", method=method, **FLUX_ERASE)
    assert changed(before, snapshot(flux_pipe)) == [] and de.get_erasures(flux_pipe) == []


def test_exports_use_the_names_diffusers_and_comfyui_read_for_flux(flux_pipe, tokenizer_dir, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    de.erase_concept(flux_pipe, "cat", **NO_CORPUS)
    edited = {n: m.weight.detach().clone() for n, m in {**text_readers(flux_pipe),
                                                         **pooled_readers(flux_pipe)}.items()}
    keys = {}
    for fmt in ("lora", "kohya", "diff"):
        path = de.export_adapter(flux_pipe, tmp_path / f"{fmt}.safetensors", format=fmt)
        with safe_open(str(path), "pt") as f:
            keys[fmt] = set(f.keys())
        fresh = make_flux_pipeline(tokenizer_dir)
        de.load_erasure_adapter(fresh, path)  # and our own loader reads every form back
        for name, weight in edited.items():
            assert torch.allclose(fresh.transformer.get_submodule(name[len("transformer."):]).weight, weight,
                                  atol=1e-5), (fmt, name)
    # diffusers' FLUX LoRA keys, which FluxPipeline.load_lora_weights reads and ComfyUI maps ("transformer.…").
    assert keys["lora"] == {f"{n}.lora_{x}.weight" for n in edited for x in "AB"}
    # kohya-ss's FLUX names are the original checkpoint's (txt_in, vector_in.in_layer): ComfyUI's `lora_unet_` map.
    assert keys["kohya"] == {f"lora_unet_{m}.{x}" for m in ("txt_in", "vector_in_in_layer")
                             for x in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys["diff"] == {"lora_unet_txt_in.diff", "lora_unet_vector_in_in_layer.diff"}
    plain = make_flux_pipeline(tokenizer_dir)
    plain.load_lora_weights(str(tmp_path / "lora.safetensors"))
    plain.fuse_lora()
    for name, weight in edited.items():
        layer = plain.transformer.get_submodule(name[len("transformer."):])
        fused = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        assert torch.allclose(fused, weight, atol=1e-5), name
