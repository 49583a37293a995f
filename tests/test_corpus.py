"""The general caption corpus and the preservation it feeds: deterministic captions, clear refusals for bad
corpora, and the closed form with the corpus prior equal to a direct computation."""

import pytest
import torch
from conftest import snapshot

import diffusers_erase as de
from diffusers_erase import corpus, text
from diffusers_erase.methods.uce import closed_form_edit, text_edit


def _map(delta):
    return delta.p if delta.q is None else delta.p @ delta.q


def test_captions_are_distinct_generic_and_the_same_every_time():
    first = corpus.captions(500)
    assert first == corpus.captions(500) and len(set(first)) == 500
    assert corpus.captions(500, seed=1) != first
    assert all(c and c == c.strip() for c in first)
    assert corpus.read_corpus("builtin") == corpus.captions()


def test_expanded_preserve_prompts_keep_the_prompt_and_vary_its_context():
    variants = corpus.expand_preserved("a square", 12)
    assert variants[0] == "a square" and len(set(variants)) == 13
    assert all("square" in v for v in variants)
    assert corpus.expand_preserved("a square", 12) == variants


def test_a_corpus_file_is_read_one_caption_a_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a cat on a mat\n\n  a dog in a park  \n", encoding="utf-8")
    assert corpus.read_corpus(path) == ["a cat on a mat", "a dog in a park"]


@pytest.mark.parametrize("content,match", [(b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_a_corpus_file_that_is_not_text_is_refused(tmp_path, content, match):
    path = tmp_path / "cache.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        corpus.read_corpus(path)


@pytest.mark.parametrize("value,error", [("no/such/file.txt", FileNotFoundError), ([], ValueError),
                                         (["a cat", 3], TypeError)])
def test_bad_corpora_are_refused_and_change_nothing(sd_pipe, value, error):
    de.enable_erasure(sd_pipe)
    before = snapshot(sd_pipe)
    with pytest.raises(error, match="preserve_corpus"):
        sd_pipe.erase_concept("cat", method="uce", preserve_corpus=value)
    assert all(torch.equal(before[k], v) for k, v in snapshot(sd_pipe).items())
    assert not sd_pipe.erasures


def test_the_corpus_prior_enters_the_solve_as_weighted_mean_statistics(sd_pipe):
    de.enable_erasure(sd_pipe)
    captions = ["a photo of a dog on a beach", "an old wooden chair in a kitchen", "a red car at night"]
    weight = 50.0
    erasure = sd_pipe.erase_concept("cat", method="uce", anchor="dog", preserve=["a bird"], preserve_corpus=captions,
                                    preserve_corpus_weight=weight, token_policy="last_subject",
                                    preserve_token_policy="last_subject")
    gram, count = text.preserve_statistics(sd_pipe, captions, "all")
    keep, _ = text.preserve_statistics(sd_pipe, ["a bird"], "last_subject")
    erase, target = text.concept_anchor_columns(sd_pipe, ["cat"], ["dog"], "last_subject")
    p, q = closed_form_edit(erase, target, keep, lamb=0.5, erase_scale=1.0, preserve_scale=1.0,
                            prior=weight * gram / count)
    expected = text_edit(sd_pipe, p, q)
    for name, delta in erasure.edit.deltas.items():
        assert torch.allclose(_map(delta), _map(expected.deltas[name]), atol=1e-6)


def test_a_heavier_corpus_weight_moves_the_corpus_less_and_long_captions_are_read(sd_pipe):
    # Minimising f + w·g, the penalised term g (here Σ ‖ΔW c‖² over the corpus' columns) cannot grow with w.
    de.enable_erasure(sd_pipe)
    captions = ["a very long caption " * 10, "a dog"]  # the first is longer than the 77-token window
    columns = text.encode(sd_pipe, captions, full_length=True, lengths=[77, 77]).reshape(-1, 32)
    before, moved = snapshot(sd_pipe), []
    for weight in (0.0, 1e1, 1e3):
        sd_pipe.erase_concept("cat", method="uce", anchor="dog", preserve_corpus=captions,
                              preserve_corpus_weight=weight)
        after = snapshot(sd_pipe)
        moved.append(sum(float(((after[k] - before[k]) @ columns.T).norm() ** 2) for k in after
                         if k.endswith(("to_k.weight", "to_v.weight")) and "attn2" in k))
        sd_pipe.unload_erasure()
    assert moved[0] > moved[1] > moved[2] > 0


def test_a_user_corpus_is_recorded_and_round_trips(sd_pipe, tmp_path):
    de.enable_erasure(sd_pipe)
    sd_pipe.erase_concept("cat", method="uce", preserve_corpus=["a dog on a beach", "a red car"])
    sd_pipe.save_erasure_adapter(tmp_path / "a")
    sd_pipe.unload_erasure()
    sd_pipe.load_erasure_adapter(tmp_path / "a")
    assert sd_pipe.erasures[0].options["preserve_corpus"] in (["a dog on a beach", "a red car"],
                                                                  ("a dog on a beach", "a red car"))
