"""The contract every registered method keeps, run through one METHOD_CASES row per method (diffusers' and peft's
test-matrix pattern): only declared targets change, unload is bit-exact, save → load on a fresh pipeline
reproduces the edit, a failure on the last target changes nothing, bad options are refused, every export the
kind supports round-trips, and the card renders.

`scale_guard` is a test-only method of the third kind (a `Guard`), so the matrix also covers the sampling-time
machinery that SAFREE and SLD build on."""

import dataclasses
from typing import ClassVar

import pytest
import torch
from conftest import (
    FLUX_ERASE,
    call_kwargs,
    changed,
    erase_kwargs,
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sd_pipeline,
    make_sdxl_pipeline,
    snapshot,
)

import diffusers_erase as de
from diffusers_erase import state
from diffusers_erase.config import ErasureConfig
from diffusers_erase.families import denoiser
from diffusers_erase.kinds import Guard, register_guard
from diffusers_erase.registry import available_methods, register_method


@register_guard
class ScaleGuard(Guard):
    """Scales the prompt embeddings the denoiser reads by `settings["scale"]` (a test-only guard)."""

    guard_type = "test_scale"

    def attach(self, pipe):
        scale = float(self.settings["scale"])

        def hook(module, args, kwargs):
            hidden = kwargs.get("encoder_hidden_states")
            if hidden is not None:
                kwargs["encoder_hidden_states"] = hidden * scale * self.tensors["ones"].to(hidden)
            return args, kwargs

        return [denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)]


@dataclasses.dataclass(frozen=True)
class ScaleGuardConfig(ErasureConfig):
    method: ClassVar[str] = "scale_guard"
    scale: float = 0.5


if "scale_guard" not in available_methods():
    @register_method(ScaleGuardConfig)
    def _scale_guard(pipe, config, concepts, anchors, preserve):
        return ScaleGuard({"ones": torch.ones(1)}, {"scale": config.scale})


TINY_SPM = dict(iterations=2, lr=1e-2, max_denoising_steps=3, la_samples=1)
TINY_SPM_MMDIT = {**TINY_SPM, "resolution": 16, **FLUX_ERASE}  # the tiny pipelines' CALL_SIZE
TINY_ESD = dict(iterations=2, lr=1e-2, ddim_steps=3)
TINY_MACE = dict(iterations=2, num_images=1, sampling_steps=2)
TINY_ADV = dict(iterations=2, lr=1e-2, ddim_steps=3, attack_step=1, warmup_iter=1, retain_batch=2)
# (method, options, pipeline factory, exports that must round-trip)
METHOD_CASES = [
    ("uce", {}, make_sd_pipeline, ("kohya", "diff", "lora", "peft")),
    ("uce", {}, make_sdxl_pipeline, ("kohya", "diff", "lora")),
    ("uce", FLUX_ERASE, make_flux_pipeline, ("kohya", "diff", "lora")),
    ("rece", {"epochs": 1}, make_sd_pipeline, ("kohya", "diff", "lora", "peft")),
    ("rece", {"epochs": 1, **FLUX_ERASE}, make_flux_pipeline, ("kohya",)),
    ("uce", FLUX_ERASE, make_sd3_pipeline, ("kohya", "diff", "lora")),
    ("rece", {"epochs": 1, **FLUX_ERASE}, make_sd3_pipeline, ("lora",)),
    ("speed", {}, make_sd_pipeline, ("kohya", "diff", "lora", "peft")),
    ("speed", {"params": "KV"}, make_sdxl_pipeline, ("kohya", "diff", "lora")),
    ("mace", TINY_MACE, make_sd_pipeline, ("diff",)),
    ("spm", TINY_SPM, make_sd_pipeline, ("kohya", "lora")),
    ("spm", TINY_SPM, make_sdxl_pipeline, ("kohya", "lora")),
    ("spm", TINY_SPM_MMDIT, make_sd3_pipeline, ("lora",)),
    ("spm", TINY_SPM_MMDIT, make_flux_pipeline, ("lora",)),
    ("esd", TINY_ESD, make_sd_pipeline, ("diff",)),
    ("esd", {**TINY_ESD, "lora_rank": 1}, make_sd_pipeline, ("kohya", "lora", "peft")),
    ("esd", {**TINY_ESD, "lora_rank": 1}, make_sdxl_pipeline, ("kohya", "lora")),
    ("advunlearn", TINY_ADV, make_sd_pipeline, ("diff",)),
    ("fewshot", {"zero_shot": True, "lr": 1e-2, "epochs": 1}, make_sd_pipeline, ("diff",)),
    ("fewshot", {"zero_shot": True, "lr": 1e-2, "epochs": 1, "lora_rank": 1}, make_sd_pipeline, ("kohya", "lora")),
    ("sld", {"sld_warmup_steps": 0}, make_sd_pipeline, ()),
    ("sld", {"sld_warmup_steps": 0}, make_sdxl_pipeline, ()),
    ("safree", {}, make_sd_pipeline, ()),
    ("safree", {}, make_sdxl_pipeline, ()),
    ("scale_guard", {}, make_sd_pipeline, ()),
]
IDS = [f"{m}-{f.__name__.split('_')[1]}" + ("-lora" if o.get("lora_rank") else "") for m, o, f, _ in METHOD_CASES]


def test_every_registered_method_has_a_row():
    assert sorted({m for m, *_ in METHOD_CASES}) == available_methods()


def _output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.from_numpy(pipe("a cat", num_inference_steps=2, generator=generator, output_type="np",
                                 **call_kwargs(pipe)).images)


@pytest.fixture(params=METHOD_CASES, ids=IDS)
def case(request, tokenizer_dir):
    method, options, factory, exports = request.param
    return method, options, lambda: factory(tokenizer_dir), exports


def test_only_declared_targets_change_and_unload_is_bit_exact(case):
    method, options, make, _ = case
    pipe = make()
    before, flags = snapshot(pipe), [p.requires_grad for p in denoiser(pipe).parameters()]
    reference = _output(pipe)
    record = de.erase_concept(pipe, "cat", method=method, **options)
    touched = set(changed(before, snapshot(pipe)))
    assert touched == set(record.edit.weight_deltas())  # nothing else, and every declared weight target
    assert touched <= set(record.modules)
    assert not torch.equal(_output(pipe), reference)  # the edit acts, whatever its kind
    de.unload_erasure(pipe)
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []
    assert torch.equal(_output(pipe), reference)  # hooks gone too
    assert flags == [p.requires_grad for p in denoiser(pipe).parameters()]


def test_save_then_load_on_a_fresh_pipeline_reproduces_the_edit(case, tmp_path):
    method, options, make, _ = case
    pipe = make()
    de.erase_concept(pipe, "cat", method=method, **options)
    path = de.save_erasure_adapter(pipe, tmp_path)
    fresh = make()
    loaded = de.load_erasure_adapter(fresh, path)
    assert [e.method for e in loaded] == [method] and loaded[0].concepts == ["cat"]
    assert type(loaded[0].edit) is type(de.get_erasures(pipe)[0].edit)
    assert torch.allclose(_output(fresh), _output(pipe), atol=1e-5)
    for name, value in snapshot(pipe).items():
        assert torch.allclose(snapshot(fresh)[name], value, atol=1e-6), name


def test_a_failure_on_the_last_target_changes_nothing(case, monkeypatch):
    method, options, make, _ = case
    pipe = make()
    de.erase_concept(pipe, "tree", **erase_kwargs(pipe))  # an erasure already there must survive
    before, records = snapshot(pipe), de.get_erasures(pipe)
    reference = _output(pipe)
    record = de.erase_concept(pipe, "cat", method=method, **options)
    de.unload_erasure(pipe)
    de.erase_concept(pipe, "tree", **erase_kwargs(pipe))
    last = list(record.modules)[-1] if record.modules else None
    if record.edit.weight_deltas():  # weight edits: fail on the last parameter's update
        kind = type(next(iter(record.edit.deltas.values())))  # every payload of these rows has one type
        calls, count, real = [], len(record.edit.weight_deltas()), kind.apply_

        def failing(self, weight, scale=1.0, what="edit"):
            calls.append(1)
            if len(calls) == count:
                raise RuntimeError("injected failure")
            real(self, weight, scale, what)

        monkeypatch.setattr(kind, "apply_", failing)
    elif last is not None:  # membranes: fail while hooking the last module
        real_get = state.get_module

        def failing_get(pipe, name):
            if f"{name}.weight" == last:
                raise RuntimeError("injected failure")
            return real_get(pipe, name)

        monkeypatch.setattr("diffusers_erase.runtime.get_module", failing_get)
    else:  # guards: fail while attaching
        def failing_attach(self, pipe):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(type(record.edit), "attach", failing_attach)
    with pytest.raises(RuntimeError, match="injected"):
        de.erase_concept(pipe, "cat", method=method, **options)
    assert changed(before, snapshot(pipe)) == [] and [e.concepts for e in de.get_erasures(pipe)] == [
        e.concepts for e in records]
    monkeypatch.undo()
    assert torch.equal(_output(pipe), reference)


def test_unknown_options_are_refused_and_change_nothing(case):
    method, _, make, _ = case
    pipe = make()
    before = snapshot(pipe)
    with pytest.raises(TypeError, match="Unknown option"):
        de.erase_concept(pipe, "cat", method=method, bogus_option=1)
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []


def _export(pipe, fmt: str, folder):
    """Write `fmt` into `folder`; returns the file `load_erasure_adapter` reads back."""
    if fmt == "peft":
        return de.export_peft(pipe, folder / "peft") / "adapter_model.safetensors"
    return de.export_adapter(pipe, folder / f"{fmt}.safetensors", format=fmt)


def test_every_supported_export_round_trips_and_others_are_refused(case, tmp_path):
    method, options, make, exports = case
    pipe = make()
    de.erase_concept(pipe, "cat", method=method, **options)
    for fmt in ("kohya", "diff", "lora", "peft"):
        if fmt not in exports:
            if isinstance(de.get_erasures(pipe)[0].edit, Guard):
                with pytest.raises(ValueError, match="no LoRA form"):
                    _export(pipe, fmt, tmp_path)
            continue
        path = _export(pipe, fmt, tmp_path)
        fresh = make()
        de.load_erasure_adapter(fresh, path)
        if method == "spm":  # exports hold membranes statically: compare with the static membrane
            de.set_erasure_adapters(pipe, "default", gating=False)
            de.set_erasure_adapters(fresh, "default", gating=False)
        assert torch.allclose(_output(fresh), _output(pipe), atol=1e-4), fmt
        if method == "spm":
            de.set_erasure_adapters(pipe, "default", gating=True)


def test_the_card_renders(case, tmp_path):
    method, options, make, _ = case
    pipe = make()
    de.erase_concept(pipe, "cat", method=method, **options)
    card = de.model_card(de.save_erasure_adapter(pipe, tmp_path))
    assert f"`{method}`" in card.text and "## What was erased" in card.text
