"""Thread safety (docs/threads.md): erase/load/unload/fuse/set-adapters are mutually exclusive per pipeline state,
and membrane gates belong to the denoising call that computed them."""

import threading

import torch
from conftest import make_sd_pipeline, snapshot
from diffusers import StableDiffusionPipeline

import diffusers_erase as de
from diffusers_erase import deltas, engine
from diffusers_erase.deltas import LowRank
from diffusers_erase.families import membrane_targets
from diffusers_erase.kinds import Erasure, Membrane
from diffusers_erase.text import encode


def test_unload_during_an_erase_waits_for_it(sd_pipe, monkeypatch):
    """The race the hardening issue found: unload between an erase's stash and its edit of the next layer left that
    layer edited for good. Here unload is started while the erase is inside its first layer edit."""
    original = snapshot(sd_pipe)
    editing, calls = threading.Event(), []
    apply = deltas.TextMap.apply_

    def slow_apply(self, weight, scale=1.0, what="edit"):
        calls.append(what)
        if len(calls) == 1:
            editing.set()
            threading.Event().wait(0.3)  # give the unloading thread every chance to run now
        return apply(self, weight, scale, what)

    monkeypatch.setattr(deltas.TextMap, "apply_", slow_apply)
    outcome = {}

    def erase():
        try:
            outcome["record"] = de.erase_concept(sd_pipe, "cat")
        except BaseException as error:  # noqa: BLE001 - reported below, not swallowed by the thread
            outcome["error"] = error

    eraser = threading.Thread(target=erase)
    eraser.start()
    assert editing.wait(10)
    de.unload_erasure(sd_pipe)  # must wait for the erase to finish, then remove all of it
    eraser.join(10)
    assert "error" not in outcome and "record" in outcome, outcome  # the erase completed before the unload
    assert de.get_erasures(sd_pipe) == []
    after = snapshot(sd_pipe)
    assert [k for k in original if not torch.equal(original[k], after[k])] == []


def _membrane_pipe(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for name, module in membrane_targets(pipe).items():
        out, inp = module.weight.shape[0], module.weight[0].numel()
        factors[f"{name}.weight"] = LowRank(torch.randn(out, 1, generator=generator),
                                            torch.randn(1, inp, generator=generator))
    erasure = Erasure("spm", ["cat"], [""], [], {}, edit=Membrane(factors, ["cat"]))
    engine.install(pipe, [erasure])
    return pipe


def test_concurrent_denoising_calls_keep_their_own_gates(tokenizer_dir):
    """Two pipelines sharing one UNet with a gated membrane, denoising at once: one prompt opens the gate fully,
    the other (random embeddings) leaves it shut. Both threads are held inside the UNet until both have
    computed their gates, so a shared gate would give one of them the other's."""
    pipe = _membrane_pipe(tokenizer_dir)
    other = StableDiffusionPipeline(**pipe.components)
    unet = pipe.unet
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    opened = encode(pipe, ["cat"], full_length=True)
    shut = torch.randn(opened.shape, generator=generator)
    assert de.erasure_gates(pipe, ["cat"])["default"] == [1.0]

    def run(hidden):
        with torch.no_grad():
            return unet(latents, 10, encoder_hidden_states=hidden).sample

    alone = {"opened": run(opened), "shut": run(shut)}
    de.set_erasure_adapters(pipe, "default", weights=0.0)
    assert not torch.equal(run(opened), alone["opened"])  # the membrane acts on the opened prompt
    de.set_erasure_adapters(other, "default", weights=1.0)

    barrier = threading.Barrier(2, timeout=20)
    held = unet.down_blocks[0].attentions[0].proj_in  # runs once per call, after the gates are computed

    def hold(module, args):
        barrier.wait()

    handle = held.register_forward_pre_hook(hold)
    results = {}

    def worker(name, hidden):
        results[name] = run(hidden)

    try:
        threads = [threading.Thread(target=worker, args=("opened", opened)),
                   threading.Thread(target=worker, args=("shut", shut))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        handle.remove()
    for name in alone:
        assert torch.allclose(results[name], alone[name], atol=1e-5, rtol=0), name
