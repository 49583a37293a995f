"""The closed-form algebra of UCE and RECE, checked against independent computations on random tensors."""

import pytest
import torch

from diffusers_erase.methods.rece import RECEConfig, adversarial_solve, rece_epochs
from diffusers_erase.methods.uce import closed_form_edit


def _problem(seed=0, dim=12, out=9, n_erase=2, n_keep=5):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, dim, generator=g, dtype=torch.float64)
    erase = torch.randn(n_erase, dim, generator=g, dtype=torch.float64)
    target = torch.randn(n_erase, dim, generator=g, dtype=torch.float64)
    keep = torch.randn(n_keep, dim, generator=g, dtype=torch.float64)
    return weight, erase, target, keep


def _edited(weight, p, q):
    return weight @ (torch.eye(weight.shape[1], dtype=weight.dtype) + p.double() @ q.double())


@pytest.mark.parametrize("lamb,erase_scale,preserve_scale", [(0.5, 1.0, 1.0), (0.1, 2.0, 0.3), (3.0, 0.5, 0.0)])
def test_matches_least_squares_on_the_stacked_system(lamb, erase_scale, preserve_scale):
    weight, erase, target, keep = _problem()
    p, q = closed_form_edit(
        erase.float(), target.float(), keep.T @ keep,
        lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
    )
    # UCE minimises λ‖W'−W‖² + s_e Σ‖W'c_e − W c_a‖² + s_p Σ‖W'c_p − W c_p‖²: a stacked least-squares problem
    # X W'ᵀ = Y, solved here by lstsq without any of the closed form's algebra.
    dim = weight.shape[1]
    rows = [lamb**0.5 * torch.eye(dim, dtype=torch.float64), erase_scale**0.5 * erase, preserve_scale**0.5 * keep]
    goals = [lamb**0.5 * weight.T, erase_scale**0.5 * (target @ weight.T), preserve_scale**0.5 * (keep @ weight.T)]
    reference = torch.linalg.lstsq(torch.cat(rows), torch.cat(goals)).solution.T
    assert torch.allclose(_edited(weight, p, q), reference, rtol=1e-4, atol=1e-4)


def test_matches_the_paper_formula_with_an_explicit_inverse():
    weight, erase, target, keep = _problem(seed=1)
    lamb, s_e, s_p = 0.5, 1.0, 1.0
    mat1 = lamb * weight + s_e * (weight @ target.T) @ erase + s_p * (weight @ keep.T) @ keep
    mat2 = lamb * torch.eye(weight.shape[1], dtype=torch.float64) + s_e * erase.T @ erase + s_p * keep.T @ keep
    p, q = closed_form_edit(erase.float(), target.float(), keep.T @ keep, lamb=lamb, erase_scale=s_e,
                            preserve_scale=s_p)
    assert torch.allclose(_edited(weight, p, q), mat1 @ torch.inverse(mat2), rtol=1e-4, atol=1e-4)


def test_without_regularisation_the_concept_maps_onto_the_anchor():
    weight, erase, target, _ = _problem(seed=2, n_erase=1)
    p, q = closed_form_edit(erase.float(), target.float(), None, lamb=1e-6, erase_scale=1.0, preserve_scale=1.0)
    new = _edited(weight, p, q)
    assert torch.allclose(new @ erase[0], weight @ target[0], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(weight @ erase[0], weight @ target[0], atol=1e-1)  # it did move


def test_a_strong_preserve_term_keeps_preserved_outputs():
    weight, erase, target, keep = _problem(seed=3, dim=16, n_erase=1, n_keep=3)
    p, q = closed_form_edit(erase.float(), target.float(), keep.T @ keep, lamb=1e-4, erase_scale=1.0,
                            preserve_scale=1e3)
    new = _edited(weight, p, q)
    assert torch.allclose(new @ keep.T, weight @ keep.T, rtol=1e-3, atol=1e-3)
    assert torch.allclose(new @ erase[0], weight @ target[0], rtol=1e-2, atol=1e-2)


def test_a_huge_lambda_leaves_the_weight_unchanged():
    weight, erase, target, keep = _problem(seed=4)
    p, q = closed_form_edit(erase.float(), target.float(), None, lamb=1e9, erase_scale=1.0, preserve_scale=1.0)
    assert torch.allclose(_edited(weight, p, q), weight, atol=1e-6)


def test_singular_system_raises_with_advice():
    erase = torch.ones(2, 4)  # two identical columns and no regularisation: M is singular
    with pytest.raises(FloatingPointError, match="larger `lamb`"):
        closed_form_edit(erase, torch.zeros(2, 4), None, lamb=0.0, erase_scale=1.0, preserve_scale=1.0)


def test_adversarial_embedding_matches_the_per_layer_sum():
    g = torch.Generator().manual_seed(5)
    dim = 10
    layers = [torch.randn(out, dim, generator=g) for out in (6, 8, 6, 8)]
    p, q = torch.randn(dim, 2, generator=g) * 0.3, torch.randn(2, dim, generator=g) * 0.3
    concept = torch.randn(3, dim, generator=g)
    t = torch.eye(dim) + p @ q
    edited = [w @ t for w in layers]
    # RECE, as written in the paper: c_adv = (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀ W c, layer by layer.
    lhs = sum(we.T @ we for we in edited) + 0.1 * torch.eye(dim)
    rhs = sum(we.T @ w for we, w in zip(edited, layers))
    reference = (torch.linalg.inv(lhs) @ rhs @ concept.T).T
    gram = sum(w.T @ w for w in layers)
    assert torch.allclose(adversarial_solve(gram, p, q, 0.1, concept.T).T, reference, rtol=1e-4, atol=1e-4)
    a = adversarial_solve(gram, p, q, 0.1, torch.eye(dim))
    assert torch.allclose((a @ concept.T).T, reference, rtol=1e-4, atol=1e-4)


def test_more_columns_than_dimensions_gives_the_same_map():
    weight, erase, target, keep = _problem(seed=6, dim=6, n_erase=9)  # 9 columns in 6 dimensions
    kwargs = dict(lamb=0.5, erase_scale=1.0, preserve_scale=1.0)
    p, q = closed_form_edit(erase, target, keep.T @ keep, **kwargs)
    assert p.shape == (6, 6) and torch.equal(q, torch.eye(6))
    mat1 = 0.5 * weight + (weight @ target.T) @ erase + (weight @ keep.T) @ keep
    mat2 = 0.5 * torch.eye(6, dtype=torch.float64) + erase.T @ erase + keep.T @ keep
    assert torch.allclose(_edited(weight, p, q), mat1 @ torch.inverse(mat2), rtol=1e-4, atol=1e-4)


def test_rece_low_rank_and_statistics_forms_agree():
    g = torch.Generator().manual_seed(7)
    dim = 8
    layers = [torch.randn(out, dim, generator=g, dtype=torch.float64) for out in (6, 10, 6, 10)]
    erase, target = torch.randn(3, dim, generator=g), torch.randn(3, dim, generator=g)
    keep = torch.randn(4, dim, generator=g, dtype=torch.float64)
    gram = sum(w.T @ w for w in layers)
    config = RECEConfig(epochs=3)
    low_rank = rece_epochs(erase, target, keep.T @ keep, gram, config, gram_form=False)
    statistics = rece_epochs(erase, target, keep.T @ keep, gram, config, gram_form=True)
    assert [p.shape[1] for p, _ in low_rank] == [3, 6, 9, 12]  # E more columns per epoch
    for (p1, q1), (p2, q2) in zip(low_rank, statistics):
        assert torch.allclose(p1 @ q1, p2 @ q2, rtol=1e-4, atol=1e-4)
