"""SPEED's closed form against the reference formula, its guarantees (retained embeddings and the empty prompt keep
their outputs), and its refusals."""

import logging

import pytest
import torch
from conftest import snapshot

import diffusers_erase as de
from diffusers_erase import text
from diffusers_erase.corpus import OBJECTS
from diffusers_erase.families import text_readers
from diffusers_erase.methods.speed import null_constraints

RETAIN = ["a dog", "a house", "a tree"]


def _to_v(pipe):
    return {name: module for name, module in text_readers(pipe).items() if name.endswith(".to_v")}


def _last(pipe, prompts):
    lengths = text.token_lengths(pipe, prompts)
    rows = text.encode(pipe, prompts, full_length=False, lengths=lengths).double()
    return torch.stack([rows[i, n - 2] for i, n in enumerate(lengths)])


def test_matches_the_reference_formula_with_explicit_inverses(sd_pipe):
    de.enable_erasure(sd_pipe)
    weights = {name: m.weight.detach().double().clone() for name, m in _to_v(sd_pipe).items()}
    t, a, r = _last(sd_pipe, ["cat", "bird"]), _last(sd_pipe, ["", ""]), _last(sd_pipe, RETAIN)
    # Anchor "": the reference's index (#non-pad tokens − 2) is the start token.
    null = text.encode(sd_pipe, [""], full_length=True, lengths=text.token_lengths(sd_pipe, [""])).double()[0]
    a = null[:1].expand(2, -1)
    k2 = null_constraints(sd_pipe, 3, torch.Generator().manual_seed(0))
    lamb, alpha, tau = 0.3, 0.8, 0.1
    sd_pipe.erase_concept(["cat", "bird"], method="speed", anchor="", preserve=RETAIN, aug_num=0, lamb=lamb,
                          retain_scale=alpha, threshold=tau)
    eye = torch.eye(t.shape[1], dtype=torch.float64)
    c_tt, c_at, c_rr = t.T @ t / 2, a.T @ t / 2, r.T @ r / 3
    values, vectors = torch.linalg.eigh(c_rr)
    null_basis = vectors[:, values < tau * values.mean()]
    p = null_basis @ null_basis.T
    m = torch.linalg.inv(c_tt @ p + alpha * eye)
    inner = eye - m @ k2 @ torch.linalg.inv(k2.T @ p @ m @ k2 + lamb * torch.eye(k2.shape[1], dtype=torch.float64)) \
        @ k2.T @ p
    for name, module in _to_v(sd_pipe).items():
        w = weights[name]
        expected = w + w @ (c_at - c_tt) @ p @ inner @ m
        assert torch.allclose(module.weight.double(), expected, atol=1e-4, rtol=1e-4), name


def test_retained_embeddings_and_the_empty_prompt_keep_their_outputs(sd_pipe):
    de.enable_erasure(sd_pipe)
    before = {name: m.weight.detach().double().clone() for name, m in _to_v(sd_pipe).items()}
    others = {name: w.clone() for name, w in snapshot(sd_pipe).items() if ".to_v." not in name}
    t, a, r = _last(sd_pipe, ["cat"]), _last(sd_pipe, ["fox"]), _last(sd_pipe, RETAIN)
    k2 = null_constraints(sd_pipe, 3, torch.Generator().manual_seed(0))
    sd_pipe.erase_concept("cat", method="speed", anchor="fox", preserve=RETAIN, prior_filter=False)
    after = snapshot(sd_pipe)
    assert all(torch.equal(after[name], w) for name, w in others.items())  # only to_v is edited (params="V")
    for name, module in _to_v(sd_pipe).items():
        w, w2 = before[name], module.weight.detach().double()
        delta = w2 - w
        moved = (delta @ t.T).norm()
        assert moved > 0.05 * (w @ t.T).norm(), name
        assert (w2 @ t.T - w @ a.T).norm() < (w @ t.T - w @ a.T).norm(), name  # the concept goes toward "fox"
        assert (delta @ r.T).norm() < 1e-3 * moved, name  # null-space constraint
        assert (delta @ k2).norm() < 1e-3 * moved, name  # equality constraints on the empty prompt (λ = 0)


def test_keys_and_values_are_edited_when_asked(sd_pipe):
    de.enable_erasure(sd_pipe)
    erasure = sd_pipe.erase_concept("cat", method="speed", params="KV", preserve=RETAIN)
    names = set(erasure.edit.deltas)
    assert any(".to_k." in n for n in names) and any(".to_v." in n for n in names)
    assert set(text_readers(sd_pipe)) == {n.removesuffix(".weight") for n in names}


def test_is_seeded(sd_pipe):
    de.enable_erasure(sd_pipe)
    first = sd_pipe.erase_concept("cat", method="speed", preserve=RETAIN, seed=3)
    first = {k: (d.p.clone(), d.q.clone()) for k, d in first.edit.deltas.items()}
    sd_pipe.unload_erasure()
    again = sd_pipe.erase_concept("cat", method="speed", preserve=RETAIN, seed=3)
    for name, delta in again.edit.deltas.items():
        assert torch.equal(delta.p, first[name][0]) and torch.equal(delta.q, first[name][1])


@pytest.mark.parametrize("options,match", [
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.0}, "threshold"),
    ({"retain_scale": 0.0}, "retain_scale"),
    ({"params": "Q"}, "params"),
    ({"token_policy": "tail"}, "token_policy"),
])
def test_bad_options_are_refused(sd_pipe, options, match):
    de.enable_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    with pytest.raises(ValueError, match=match):
        sd_pipe.erase_concept("cat", method="speed", **options)
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd_pipe).items())


def test_a_retain_set_that_only_names_the_concept_is_refused(sd_pipe):
    de.enable_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    with pytest.raises(ValueError, match="names an erased concept"):
        sd_pipe.erase_concept("cat", method="speed", preserve=["a cat", "the Cat sleeping"])
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd_pipe).items())
    assert not sd_pipe.erasures


def test_without_a_preserve_list_the_empty_prompt_is_retained(sd_pipe):
    de.enable_erasure(sd_pipe)
    before = {name: m.weight.detach().double().clone() for name, m in _to_v(sd_pipe).items()}
    null = text.encode(sd_pipe, [""], full_length=True, lengths=text.token_lengths(sd_pipe, [""])).double()[0, 1:]
    concept = text.encode(sd_pipe, ["nudity"], full_length=True,
                          lengths=text.token_lengths(sd_pipe, ["nudity"])).double()[0, 1:]
    # The null tokens span the space, so the null space keeps only their weakest directions (eigenvalue < τ × the
    # mean): small with every token retained and exact equality constraints, larger with the preset's IPF (it
    # keeps only the tokens the edit would move most) and λ = 0.5.
    for options, bound in (({"prior_filter": False, "lamb": 0.0}, 0.1), ({}, 0.25)):
        sd_pipe.erase_concept("nudity", method="speed", preset="nudity", **options)
        for name, module in _to_v(sd_pipe).items():
            delta = module.weight.detach().double() - before[name]
            assert (delta @ null.T).norm() < bound * (delta @ concept.T).norm(), (options, name)
        sd_pipe.unload_erasure()


def test_concepts_that_end_in_one_token_are_warned_about(sd_pipe, caplog):
    de.enable_erasure(sd_pipe)
    for method in ("speed", "uce"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusers_erase.text"):
            sd_pipe.erase_concept(["a cat", "the cat", "one black cat"], method=method, token_policy="last_subject")
        assert any("all end in the token" in r.message for r in caplog.records), method
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusers_erase.text"):
            sd_pipe.erase_concept(["a cat", "a dog"], method=method, token_policy="last_subject")
        assert not any("all end in the token" in r.message for r in caplog.records), method


@pytest.mark.parametrize("method", ["speed", "uce", "rece"])
def test_more_concepts_than_the_text_width_are_erased(sd_pipe, method):
    # 40 concepts on a 32-wide text encoder: the rank-E factors would exceed the map, so the full map is stored.
    concepts = [f"a {name}" for name in OBJECTS[:40]]
    width = next(iter(text_readers(sd_pipe).values())).in_features
    assert len(concepts) > width
    de.enable_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    sd_pipe.erase_concept(concepts, method=method, preserve=["a quiet blue sky"])
    after = snapshot(sd_pipe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(torch.isfinite(after[k]).all() for k in changed)
