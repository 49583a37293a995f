"""MACE's three stages against their formulas (closed-form refinement, LoRA fusion), the attention loss it trains
on, and its refusals. Behaviour on the shapes model: tests/test_behaviour.py."""

import pytest
import torch
from conftest import snapshot

import diffusers_erase as de
from diffusers_erase import text
from diffusers_erase.deltas import LowRank
from diffusers_erase.families import text_readers
from diffusers_erase.kinds import WeightEdit
from diffusers_erase.methods import mace

TINY = dict(iterations=2, num_images=1, sampling_steps=2)


def test_matching_columns_skip_the_differing_span_and_continue_into_the_padding():
    # "<s> a photo of van gogh </s>" against "<s> a photo of art </s>", padded to 10
    old, new = [0, 5, 6, 7, 8, 9, 1], [0, 5, 6, 7, 4, 1]
    at_old, at_new = mace.matching_columns(old, new, 10)
    assert at_old == [0, 1, 2, 3, 6, 7, 8, 9] and at_new == [0, 1, 2, 3, 5, 6, 7, 8]
    assert mace.matching_columns(new, old, 10) == (at_new, at_old)  # the longer one reaches the end
    assert mace.matching_columns(old, old, 10) == (list(range(10)), list(range(10)))


def _explicit(pipe, config, concepts, anchors, preserve):
    """Both closed forms with explicit inverses, as the reference computes them (float64)."""
    old = [p for c in concepts for p in mace.concept_prompts(config, c)]
    new = [p for a in anchors for p in mace.concept_prompts(config, a)]
    rows = text.encode(pipe, old + new, full_length=True).double()
    ids = pipe.tokenizer(old + new, truncation=True, max_length=pipe.tokenizer.model_max_length)["input_ids"]
    keys, values = [], []
    for k in range(len(old)):
        at_old, at_new = mace.matching_columns(ids[k], ids[len(old) + k], rows.shape[1])
        keys.append(rows[k, at_old])
        values.append(rows[len(old) + k, at_new])
    c, n = torch.cat(keys), torch.cat(values)
    kept = text.encode(pipe, preserve, full_length=True).double().reshape(-1, rows.shape[2])
    c0 = config.preserve_scale * kept.T @ kept  # the cache, weighted once
    eye = torch.eye(rows.shape[2], dtype=torch.float64)
    x = (n.T @ c + c0 + config.lamb * eye) @ torch.linalg.inv(c.T @ c + c0 + config.lamb * eye)
    grams = [text.encode(pipe, mace.concept_prompts(config, e), full_length=True).double().reshape(-1, rows.shape[2])
             for e in concepts]
    grams = [g.T @ g for g in grams]
    return x, c0, grams


def test_refinement_and_fusion_match_the_formulas_with_explicit_inverses(sd_pipe):
    config = mace.MACEConfig(preserve_corpus=None, lamb=0.5, **TINY)
    concepts, anchors, preserve = ["cat", "dog"], ["animal", ""], ["a tree", "a house"]
    x, c0, grams = _explicit(sd_pipe, config, concepts, anchors, preserve)
    prior = mace.preservation(sd_pipe, config, preserve)
    assert torch.allclose(prior, c0, rtol=1e-6, atol=1e-8)
    x_ours = mace._solve_map(*mace.cfr_statistics(sd_pipe, config, concepts, anchors), prior, config.lamb)
    assert torch.allclose(x_ours, x, rtol=1e-5, atol=1e-7)
    readers = text_readers(sd_pipe)
    generator = torch.Generator().manual_seed(0)
    loras = [WeightEdit({f"{name}.weight": LowRank(torch.randn(m.out_features, 1, generator=generator) * 0.1,
                                                   torch.randn(1, m.in_features, generator=generator))
                         for name, m in readers.items()}) for _ in concepts]
    folded = {}
    for lora, gram in zip(loras, grams):
        mace.fold(folded, lora, gram)
    edit = mace.fuse(sd_pipe, config, x, folded, sum(grams), prior)
    eye = torch.eye(x.shape[0], dtype=torch.float64)
    m_inv = torch.linalg.inv(sum(grams) + c0 + config.lamb * eye)
    for name, module in readers.items():
        w = module.weight.detach().double()
        w1 = w @ x
        lhs = sum((w1 + lora.deltas[f"{name}.weight"].matrix(module.weight).double()) @ g
                  for lora, g in zip(loras, grams))
        expected = (lhs + w @ c0 + config.lamb * w1) @ m_inv - w
        assert torch.allclose(edit.deltas[f"{name}.weight"].delta.double(), expected, rtol=1e-4, atol=1e-5), name


def _attention_mass(pipe, prompt: str, concept: str) -> float:
    """The attention loss at fixed noisy inputs: Σ over layers, timesteps and seeds of ‖A[:, :, concept tokens]‖."""
    probe = mace._ConceptAttention()
    condition = text.encode(pipe, [prompt], full_length=True)
    probe.positions = mace.concept_positions(pipe, prompt, concept, True, condition.shape[1])
    unet = pipe.unet
    size = unet.config.sample_size
    with torch.no_grad(), mace._probing(unet, probe):
        for seed, t in enumerate((100, 300, 500, 700)):
            x = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
            unet(x, torch.tensor([t]), condition)
    return float(torch.stack(probe.norms).sum())


def test_the_loras_lower_the_concepts_attention(sd_pipe):
    config = mace.MACEConfig(preserve_corpus=None, lamb=1.0, iterations=40, lr=5e-2, num_images=2, sampling_steps=2)
    x = torch.eye(next(iter(text_readers(sd_pipe).values())).in_features)
    de.enable_erasure(sd_pipe)
    before, mass = snapshot(sd_pipe), _attention_mass(sd_pipe, "a photo of cat", "cat")
    conditions = text.encode(sd_pipe, mace.concept_prompts(config, "cat"), full_length=True)
    lora = mace.train_lora(sd_pipe, config, "cat", conditions, x, torch.Generator().manual_seed(0))
    assert set(lora.deltas) == {f"{n}.weight" for n in text_readers(sd_pipe)}
    after = snapshot(sd_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # trained beside the weights
    assert all(type(p).__name__ != "_ConceptAttention" for p in sd_pipe.unet.attn_processors.values())
    for name, module in text_readers(sd_pipe).items():
        module.weight.data += lora.deltas[f"{name}.weight"].matrix(module.weight)
    assert _attention_mass(sd_pipe, "a photo of cat", "cat") < 0.8 * mass


def test_the_attention_positions_are_the_concept_words_and_the_end_tokens(sd_pipe):
    ids = sd_pipe.tokenizer("a photo of cat", padding="max_length", max_length=24, truncation=True)["input_ids"]
    words = sd_pipe.tokenizer("cat", add_special_tokens=False)["input_ids"]
    mask = mace.concept_positions(sd_pipe, "a photo of cat", "cat", True, 24)
    start = next(i for i in range(len(ids)) if ids[i : i + len(words)] == words)
    assert mask[start : start + len(words)].all() and not mask[1:start].any()
    assert mask[ids.index(sd_pipe.tokenizer.eos_token_id)]
    assert not mace.concept_positions(sd_pipe, "a photo of cat", "cat", False, 24)[start + len(words):].any()


@pytest.mark.parametrize("options, match", [
    ({"templates": "poem"}, "templates must be one of"),
    ({"lora_rank": 2}, "leave `lora_rank` unset"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"preserve_scale": -1.0}, "preserve_scale must be ≥ 0"),
    ({"lamb": -1.0}, "lamb must be ≥ 0"),
    ({"preserve_corpus": "no/such/corpus.txt"}, "corpus"),
])
def test_bad_options_are_refused_and_change_nothing(sd_pipe, options, match):
    de.enable_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sd_pipe.erase_concept("cat", method="mace", **{**TINY, **options})
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd_pipe).items()) and not sd_pipe.erasures


def test_sdxl_is_refused_with_the_families_it_supports(sdxl_pipe):
    with pytest.raises(ValueError, match="runs on sd1, sd2 pipelines, not 'sdxl'"):
        de.erase_concept(sdxl_pipe, "cat", method="mace", **TINY)
