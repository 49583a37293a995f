"""Our UCE, RECE and SPM against small reimplementations of what their reference code runs (issue 11).

The reimplementations follow the reference scripts as read (docs/methods/*.md cite files and lines): the legacy
UCE `train-scripts/train_erase.py::edit_model`, RECE `train.py` + `erase_methods/uce.py` +
`close_form_emb.py::close_form_emb_regzero`, SPM `src/engine/sampling.py::sample` / `train_util.predict_noise`.
Each solves per layer, as the references do, in float64.
"""

import logging
import math

import pytest
import torch
from conftest import REFERENCE_UCE, kv_weights, make_sd_pipeline

import diffusers_erase as de
from diffusers_erase.families import text_pairs
from diffusers_erase.methods.spm import SPMConfig, _Trainable, anchor_rows, sample_anchors
from diffusers_erase.text import encode, subject_spans, token_lengths


def _embed(pipe, prompt):
    return encode(pipe, [prompt], full_length=True)[0].double()


def _reference_uce_step(weights, pairs, retain, lamb, erase_scale, preserve_scale, value_of=None):
    """One UCE edit of every layer as the references compute it: W_new = mat1 · mat2⁻¹ with
    mat1 = λW + e Σ (W n) oᵀ + p Σ (W k) kᵀ and mat2 = λI + e Σ o oᵀ + p Σ k kᵀ (rows of `pairs` are (old, new)
    columns; `retain` rows the preserved columns). `value_of(name, n)` gives the target value (default W n)."""
    out = {}
    for name, w in weights.items():
        w = w.double()
        old = torch.cat([o for o, _ in pairs])
        new = torch.cat([n for _, n in pairs])
        values = w @ new.T if value_of is None else value_of(name, new)
        mat1 = lamb * w + erase_scale * values @ old + preserve_scale * (w @ retain.T) @ retain
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * old.T @ old \
            + preserve_scale * retain.T @ retain
        out[name] = mat1 @ torch.linalg.inv(mat2)
    return out


def _tail_pair(pipe, concept, anchor):
    """Legacy UCE's aligned tail: from each prompt's last word token, cut to the same length."""
    n_old, n_new = (n - 2 for n in token_lengths(pipe, [concept, anchor]))
    farthest = max(n_old, n_new)
    total = _embed(pipe, concept).shape[0]
    old = _embed(pipe, concept)[n_old: total - (farthest - n_old)]
    new = _embed(pipe, anchor)[n_new: total - (farthest - n_new)]
    return old, new


def _retain(pipe, prompts):
    return torch.cat([_embed(pipe, p) for p in prompts])  # all 77 positions of each preserved prompt


def _assert_weights(pipe, expected, atol=1e-5):
    for name, weight in kv_weights(pipe).items():
        assert torch.allclose(weight.double(), expected[name], atol=atol, rtol=0), name


def test_uce_paper_preset_is_the_legacy_script(sd_pipe):
    """train_erase.py: tail columns aligned with the guide, "" always preserved at all 77 positions,
    s_p = max(0.1, 1/N), λ = 0.5."""
    base = kv_weights(sd_pipe)
    retain = ["", "a dog", "a house"]
    expected = _reference_uce_step(base, [_tail_pair(sd_pipe, "cat", "animal")], _retain(sd_pipe, retain),
                                   lamb=0.5, erase_scale=1.0, preserve_scale=max(0.1, 1 / len(retain)))
    record = de.erase_concept(sd_pipe, "cat", anchor="animal", preserve=["a dog", "a house"], preset="paper")
    assert record.preserve == retain and record.options["preset"] == "paper"
    assert record.options["token_policy"] == "tail" and record.options["preserve_token_policy"] == "all"
    _assert_weights(sd_pipe, expected)


def test_rece_starts_from_the_tail_edit_and_re_edits_as_the_reference(sd_pipe):
    base = kv_weights(sd_pipe)
    concept, guide = "cat", ""
    retain = _retain(sd_pipe, [""])
    # The initial checkpoint: legacy UCE (tail, "" preserved, s_p = max(0.1, 1/1) = 1, λ = 0.5).
    current = _reference_uce_step(base, [_tail_pair(sd_pipe, concept, guide)], retain, 0.5, 1.0, 1.0)
    # One epoch: c_adv = c (A⁻¹B)ᵀ over all 77 rows, A = λ_reg I + Σ W'ᵀW', B = Σ W'ᵀ W⁰ (close_regzero), then the
    # same update on the current weights, c_adv row i → the guide's row i, λ 0.1, s_e 1, s_p 0.1.
    dim = next(iter(base.values())).shape[1]
    a = 0.1 * torch.eye(dim, dtype=torch.float64) + sum(w.T @ w for w in current.values())
    b = sum(current[n].T @ base[n].double() for n in base)
    c_adv = _embed(sd_pipe, concept) @ torch.linalg.solve(a, b).T
    expected = _reference_uce_step(current, [(c_adv, _embed(sd_pipe, guide))], retain, 0.1, 1.0, 0.1)
    record = de.erase_concept(sd_pipe, concept, method="rece", epochs=1)
    assert record.options["initial_token_policy"] == "tail"
    _assert_weights(sd_pipe, expected, atol=1e-4)


def test_rece_keeps_the_old_all_positions_start_behind_an_option(sd_pipe, tokenizer_dir):
    other = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(sd_pipe, "cat", method="rece", epochs=0)
    de.erase_concept(other, "cat", method="rece", epochs=0, initial_token_policy="all")
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(kv_weights(sd_pipe).values(),
                                                                   kv_weights(other).values()))


def test_rece_warns_once_without_an_epoch_callback(sd_pipe, caplog, monkeypatch):
    from diffusers_erase.methods import rece

    monkeypatch.setattr(rece, "_warned_no_callback", False)
    with caplog.at_level(logging.WARNING, logger="diffusers_erase.methods.rece"):
        de.erase_concept(sd_pipe, "cat", method="rece", epochs=1)
        de.erase_concept(sd_pipe, "dog", method="rece", epochs=1)
    assert sum("without an epoch_callback" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------- presets


def test_presets_set_the_reference_recipe_and_explicit_arguments_win(sd_pipe, caplog):
    record = de.erase_concept(sd_pipe, "Van Gogh", preset="art")
    assert record.anchors == ["art"] and record.options["preset"] == "art"
    de.unload_erasure(sd_pipe)
    with caplog.at_level(logging.INFO, logger="diffusers_erase.arguments"):
        record = de.erase_concept(sd_pipe, "Van Gogh", preset="art", anchor="painting", token_policy="eot")
    assert record.anchors == ["painting"] and record.options["token_policy"] == "eot"
    assert any("overrides preset 'art'" in r.message for r in caplog.records)
    de.unload_erasure(sd_pipe)
    record = de.erase_concept(sd_pipe, "nudity", method="rece", preset="nudity")
    assert (record.options["epochs"], record.options["reg"], record.preserve) == (3, 0.1, [""])


def test_unknown_preset_and_bad_gate_power_are_refused(sd_pipe):
    with pytest.raises(ValueError, match="Unknown preset 'celebrity' for method 'uce'; its presets are: object, art, "
                                         "nudity, paper"):
        de.erase_concept(sd_pipe, "x", preset="celebrity")
    with pytest.raises(ValueError, match="Unknown preset 'art' for method 'spm'; its presets are: none"):
        de.erase_concept(sd_pipe, "x", method="spm", preset="art")
    with pytest.raises(ValueError, match="gate_power must be > 0"):
        de.erase_concept(sd_pipe, "x", method="spm", gate_power=0.0)
    assert de.get_erasures(sd_pipe) == []


# ---------------------------------------------------------------------------------------------- token picks


def test_subject_policy_erases_every_token_of_the_concept(sd_pipe):
    """A character-level tokenizer here: "cat" is three word tokens, each sent to the anchor's last token."""
    from diffusers_erase.text import concept_anchor_columns

    erase, target = concept_anchor_columns(sd_pipe, ["cat"], ["dog"], "subject")
    emb = _embed(sd_pipe, "cat").float()
    assert torch.allclose(erase, emb[1:4], atol=1e-6)  # (no padding encoded: the causal columns are the same)
    assert torch.allclose(target, _embed(sd_pipe, "dog").float()[3:4].expand(3, -1), atol=1e-6)
    # Inside a template the concept's tokens are found where they are.
    assert subject_spans(sd_pipe, ["painting by cat"], ["cat"]) == [(11, 14)]  # BOS, 8 + 2 characters, then c a t
    with pytest.raises(ValueError, match="token_policy='subject': the tokens of 'dog' do not appear"):
        subject_spans(sd_pipe, ["painting by cat"], ["dog"])


def test_expand_prompts_uses_the_reference_templates(sd_pipe):
    from diffusers_erase.text import TEMPLATES

    record = de.erase_concept(sd_pipe, "cat", anchor="animal", expand_prompts=True, preset="art")
    assert record.options["expand_prompts"] and record.options["templates"] == "art"
    assert TEMPLATES["art"] == ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
    pipe_b = make_sd_pipeline_like(sd_pipe)
    prompts = ["cat"] + [t.format("cat") for t in TEMPLATES["art"]]
    anchors = ["animal"] + [t.format("animal") for t in TEMPLATES["art"]]
    de.erase_concept(pipe_b, prompts, anchor=anchors, **REFERENCE_UCE)  # the preset's columns, no corpus
    for a, b in zip(kv_weights(sd_pipe).values(), kv_weights(pipe_b).values()):
        assert torch.allclose(a, b, atol=1e-6)


def make_sd_pipeline_like(pipe):
    tokenizer = text_pairs(pipe)[0][0]
    from diffusers_erase.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(tokenizer, 0)


def test_weak_single_token_picks_are_warned_about(sd_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_erase.text"):
        de.erase_concept(sd_pipe, "cat.")
    assert any("The last token of concept 'cat.' is '.'" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- SPM


def test_spm_anchors_the_rows_the_reference_optimises():
    """sample(): [∅, s1, ∅, s2, ∅, s3, ∅, s4]; predict_noise at guidance 1 keeps the second half."""
    target, uncond = torch.randn(5, 8), torch.randn(5, 8)
    config = SPMConfig(la_samples=4)
    rows = anchor_rows(target, uncond, config, torch.Generator().manual_seed(3))
    samples = sample_anchors(target, 4, torch.Generator().manual_seed(3))
    interleaved = [row for s in samples for row in (uncond, s)]
    assert torch.equal(rows, torch.stack(interleaved[4:]))
    assert torch.equal(rows[0], uncond) and torch.equal(rows[1], samples[2]) and torch.equal(rows[3], samples[3])
    off = anchor_rows(target, uncond, SPMConfig(la_samples=4, anchor_unconditional=False),
                      torch.Generator().manual_seed(3))
    assert torch.equal(off, samples)


def test_spm_initialisation_is_the_references():
    """kaiming_uniform_(a=√5): bound √(6 / ((1 + 5) · fan_in)) = 1/√fan_in."""
    layer = torch.nn.Linear(400, 3)
    factors = _Trainable({"x": layer}, rank=1, alpha=1.0, generator=torch.Generator().manual_seed(0), device="cpu")
    factors.remove()
    up, down = factors.factors["x"]
    bound = 1 / math.sqrt(400)
    assert float(down.abs().max()) <= bound and float(down.abs().max()) > 0.95 * bound
    assert not up.any() and down.dtype == up.dtype == torch.float32


def test_a_float16_pipeline_trains_its_membrane_like_float32(tokenizer_dir):
    options = dict(iterations=6, lr=1e-3, lr_warmup_steps=1, max_denoising_steps=3, la_samples=2)
    curves, ups = {}, {}
    for dtype in (torch.float32, torch.float16):
        pipe = make_sd_pipeline(tokenizer_dir).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        losses = []
        record = de.erase_concept(pipe, "cat", method="spm", callback=lambda i, loss, out=losses: out.append(loss),
                                  **options)
        curves[dtype] = torch.tensor(losses)
        ups[dtype] = torch.cat([d.up.flatten() for d in record.edit.deltas.values()])
        assert all(d.up.dtype == torch.float32 for d in record.edit.deltas.values())
    assert torch.allclose(curves[torch.float16], curves[torch.float32], rtol=0.25, atol=0)
    # Adam moves each factor by about lr per step whatever the gradient's size: the trained factors are as large.
    ratio = float(ups[torch.float16].norm() / ups[torch.float32].norm())
    assert 0.8 < ratio < 1.25, ratio


def test_gate_power_two_is_the_references_gamma_squared(sd_pipe, tmp_path):
    record = de.erase_concept(sd_pipe, "cat", method="spm", iterations=2, lr=1e-2, max_denoising_steps=3,
                              la_samples=1, gate_power=1.0)
    assert record.edit.gate_power == 1.0
    prompts = ["a red house", "cat"]
    gamma = de.erasure_gates(sd_pipe, prompts)["default"]
    de.set_erasure_adapters(sd_pipe, "default", gate_power=2.0)
    squared = de.erasure_gates(sd_pipe, prompts)["default"]
    assert squared == pytest.approx([g ** 2 for g in gamma], abs=1e-6)
    path = de.save_erasure_adapter(sd_pipe, tmp_path)
    de.unload_erasure(sd_pipe)
    [loaded] = de.load_erasure_adapter(sd_pipe, path)
    assert loaded.edit.gate_power == 2.0
    with pytest.raises(ValueError, match="gate_power` must be > 0"):
        de.set_erasure_adapters(sd_pipe, "default", gate_power=-1.0)
