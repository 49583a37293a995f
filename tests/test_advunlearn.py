"""AdvUnlearn on tiny pipelines: the bi-level loop (inner soft-prefix attack after the warm-up, ESD target on the
attacked prompt, retain term), what it edits, and bad input."""

import pytest
import torch
from conftest import changed, make_sd_pipeline, snapshot

import diffusers_erase as de
from diffusers_erase.families import train_group
from diffusers_erase.methods import advunlearn

TINY = dict(iterations=3, lr=1e-2, ddim_steps=3, attack_step=2, warmup_iter=1, retain_batch=2)


def test_it_edits_only_the_text_encoder_group_and_unload_restores(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    record = de.erase_concept(pipe, "cat", method="advunlearn", preserve=["a dog", "a tree"], **TINY)
    assert {n.rpartition(".")[0] for n in record.edit.deltas} == set(train_group(pipe, "text_encoder_full"))
    touched = changed(before, snapshot(pipe))
    assert touched and all(n.startswith("text_encoder.") for n in touched)
    de.unload_erasure(pipe)
    assert changed(before, snapshot(pipe)) == []


def test_the_attack_starts_after_the_warm_up_and_the_defence_trains_on_it(tokenizer_dir, monkeypatch):
    seen, conditions = [], []
    real_step, real_condition = advunlearn._State.attack_step, advunlearn.AdversarialPrefix.condition

    def step(self, prefix, concept):
        seen.append(prefix.variable.detach().clone())
        return real_step(self, prefix, concept)

    def condition(self, sample=True, fixed=False):
        conditions.append(fixed)
        return real_condition(self, sample, fixed)

    monkeypatch.setattr(advunlearn._State, "attack_step", step)
    monkeypatch.setattr(advunlearn.AdversarialPrefix, "condition", condition)
    de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="advunlearn", **TINY)
    assert len(seen) == 2 * (TINY["iterations"] - TINY["warmup_iter"])  # attack_step per attacked iteration
    assert not torch.equal(seen[0], seen[-1])  # the prefix moves, and continues from the last one
    assert conditions.count(True) == TINY["iterations"] - TINY["warmup_iter"]  # each defence step uses it, fixed


def test_retain_prompts_are_the_preserve_set_or_the_built_in_objects(tokenizer_dir, monkeypatch):
    encoded = []
    real = advunlearn.encode_condition

    def spy(pipe, prompts):
        encoded.append(list(prompts))
        return real(pipe, prompts)

    monkeypatch.setattr(advunlearn, "encode_condition", spy)  # the retain table's frozen conditions
    de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="advunlearn", preserve=["a dog"], **TINY)
    assert ["a dog"] in encoded
    encoded.clear()
    de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="advunlearn", **TINY)
    built_in = [p.format(o) for p in [advunlearn.RETAIN_TEMPLATE] for o in advunlearn.RETAIN_OBJECTS]
    assert built_in in encoded


@pytest.mark.parametrize("options, match", [
    ({"train_method": "esd-x"}, "UNet group"),
    ({"attack_method": "fgsm"}, "attack_method"),
    ({"prefix_k": 0}, "prefix_k"),
    ({"ddim_steps": 5000}, "num_train_timesteps"),
])
def test_bad_options_are_refused_and_change_nothing(tokenizer_dir, options, match):
    pipe = make_sd_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=match):
        de.erase_concept(pipe, "cat", method="advunlearn", **{**TINY, **options})
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []
    assert all(not m._forward_hooks for m in pipe.text_encoder.modules())


def test_an_anchor_is_refused(tokenizer_dir):
    with pytest.raises(ValueError, match="leave `anchor` empty"):
        de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="advunlearn", anchor="dog", **TINY)
