"""ESD and the training engine on tiny pipelines: the reference's target, parameter groups, determinism, float16
master weights, and runs that fail or are interrupted leave the pipeline untouched."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import changed, make_flux_pipeline, make_sd_pipeline, make_sdxl_pipeline, snapshot

import diffusers_erase as de
from diffusers_erase.families import TRAIN_GROUPS, train_group
from diffusers_erase.methods import _training
from diffusers_erase.methods._denoising import Condition, Denoiser
from diffusers_erase.methods.esd import ESDConfig

TINY = dict(iterations=2, lr=1e-2, ddim_steps=3)


def _modules(record) -> set[str]:
    return {name.rpartition(".")[0] for name in record.edit.deltas}


def test_groups_select_what_the_reference_selects(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    x, strict, u, everything = (set(train_group(pipe, g)) for g in ("esd-x", "esd-x-strict", "esd-u", "esd-all"))
    assert x and all(".attn2." in n for n in x) and strict < x
    assert strict == {n for n in x if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert x | u == everything and not x & u
    text = train_group(pipe, "mlp-final-attn")
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert all(".mlp.fc" in n or f"layers.{last}.self_attn." in n for n in text)
    assert any(f"layers.{last}.self_attn.q_proj" in n for n in text) and any("layers.0.mlp.fc1" in n for n in text)


def test_esd_edits_only_its_group_and_unload_restores(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    record = de.erase_concept(pipe, "cat", method="esd", train_method="esd-x-strict", **TINY)
    assert _modules(record) == set(train_group(pipe, "esd-x-strict"))
    assert all(isinstance(d, de.Dense) for d in record.edit.deltas.values())
    assert set(changed(before, snapshot(pipe))) == set(record.edit.deltas)
    de.unload_erasure(pipe)
    assert changed(before, snapshot(pipe)) == []


def _spy_on_x_t(monkeypatch) -> list:
    """Record each x_t the Denoiser draws, with the timestep ESD reads it at and its [∅; prompt] conditioning."""
    seen = []
    real = Denoiser.partial

    def spy(self, latents, k, uncond, prompt, guidance):
        x_t = real(self, latents, k, uncond, prompt, guidance)
        seen.append((x_t, self.sampler.timesteps[k], Condition.cat([uncond, prompt])))
        return x_t

    monkeypatch.setattr(Denoiser, "partial", spy)
    return seen


def test_the_loss_is_the_reference_target(tokenizer_dir, monkeypatch):
    """First iteration: ε'(x_t, c) against ε(x_t, ∅) − η(ε(x_t, c) − ε(x_t, ∅)) computed here from the frozen UNet
    at the DDIM sampler's own k-th timestep (the edit starts at zero, so ε' = ε then)."""
    pipe = make_sd_pipeline(tokenizer_dir)
    seen = _spy_on_x_t(monkeypatch)
    losses = []
    de.erase_concept(pipe, "cat", method="esd", negative_guidance=1.5, iterations=1, lr=1e-9, ddim_steps=4,
                     callback=lambda i, loss: losses.append(loss))
    de.unload_erasure(pipe)
    (x_t, t, conditioning), = seen
    with torch.no_grad():
        eps_u, eps_c = pipe.unet(x_t.expand(2, -1, -1, -1), t, conditioning.tokens).sample.chunk(2)
    assert losses[0] == pytest.approx(F.mse_loss(eps_c, eps_u - 1.5 * (eps_c - eps_u)).item(), rel=1e-4)


def test_on_sdxl_the_loss_reads_the_pooled_text_and_time_ids(tokenizer_dir, monkeypatch):
    """SDXL: the same target, with each prompt's pooled vector and the time ids (size, no crop, size) as
    `added_cond_kwargs`, as the pipeline calls its UNet; the edit stays in its group and unloads."""
    pipe = make_sdxl_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    seen = _spy_on_x_t(monkeypatch)
    losses = []
    record = de.erase_concept(pipe, "cat", method="esd", iterations=1, lr=1e-9, ddim_steps=4,
                              callback=lambda i, loss: losses.append(loss))
    assert _modules(record) == set(train_group(pipe, "esd-x"))
    de.unload_erasure(pipe)
    assert changed(before, snapshot(pipe)) == []
    (x_t, t, conditioning), = seen
    side = pipe.default_sample_size * pipe.vae_scale_factor
    ids = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)
    added = {"text_embeds": conditioning.pooled, "time_ids": ids}
    with torch.no_grad():
        eps_u, eps_c = pipe.unet(x_t.expand(2, -1, -1, -1), t, conditioning.tokens,
                                 added_cond_kwargs=added).sample.chunk(2)
    assert losses[0] == pytest.approx(F.mse_loss(eps_c, eps_u - (eps_c - eps_u)).item(), rel=1e-4)


def test_the_sdxl_preset_is_the_reference_script_and_mmdit_is_refused(tokenizer_dir):
    options = ESDConfig.presets["sdxl"]["options"]
    assert options == {"iterations": 200, "lr": 2e-4, "start_guidance": 2.0, "negative_guidance": 0.0}
    with pytest.raises(ValueError, match="runs on sd1, sd2, sdxl pipelines.*SD3/FLUX"):
        de.erase_concept(make_flux_pipeline(tokenizer_dir), "cat", method="esd", **TINY)


def test_training_is_deterministic_and_the_seed_matters(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    runs = []
    for seed in (0, 0, 1):
        record = de.erase_concept(pipe, "cat", method="esd", seed=seed, **TINY)
        runs.append({n: d.delta.clone() for n, d in record.edit.deltas.items()})
        de.unload_erasure(pipe)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_lora_rank_trains_factors_of_the_weights(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    record = de.erase_concept(pipe, "cat", method="esd", lora_rank=2, **TINY)
    assert all(isinstance(d, de.LowRank) and d.rank == 2 for d in record.edit.deltas.values())
    assert all(name.endswith(".weight") for name in record.edit.deltas)


def test_gradient_checkpointing_gives_the_same_run(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    runs = []
    for checkpointing in (False, True):
        losses = []
        record = de.erase_concept(pipe, "cat", method="esd", gradient_checkpointing=checkpointing,
                                  callback=lambda i, loss, out=losses: out.append(loss), **TINY)
        runs.append((losses, {n: d.delta for n, d in record.edit.deltas.items()}))
        de.unload_erasure(pipe)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert all(torch.allclose(runs[0][1][n], runs[1][1][n], atol=1e-7) for n in runs[0][1])
    assert not pipe.unet.is_gradient_checkpointing


def test_a_float16_pipeline_trains_float32_deltas_to_the_same_losses(tokenizer_dir):
    losses = {}
    for dtype in (torch.float32, torch.float16):
        pipe = make_sd_pipeline(tokenizer_dir).to(dtype=dtype)
        seen = []
        record = de.erase_concept(pipe, "cat", method="esd", callback=lambda i, loss, out=seen: out.append(loss),
                                  **{**TINY, "iterations": 3})
        assert all(d.delta.dtype == torch.float32 and torch.isfinite(d.delta).all()
                   for d in record.edit.deltas.values())
        losses[dtype] = seen
    assert losses[torch.float16] == pytest.approx(losses[torch.float32], rel=0.05)


@pytest.mark.parametrize("options, match", [
    ({"train_method": "xattn"}, "train_method"),
    ({"train_method": "esd-nothing"}, "valid groups: esd-x, esd-x-strict"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_rank": 10_000}, "above the width"),
    ({"iterations": 0}, "iterations"),
    ({"lr": 0.0}, "lr"),
    ({"ddim_steps": 5000}, "num_train_timesteps"),
])
def test_bad_options_are_refused_and_change_nothing(tokenizer_dir, options, match):
    pipe = make_sd_pipeline(tokenizer_dir)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=match):
        de.erase_concept(pipe, "cat", method="esd", **{**TINY, **options})
    assert changed(before, snapshot(pipe)) == [] and de.get_erasures(pipe) == []
    assert not pipe.unet._forward_hooks and all(not m._forward_hooks for m in pipe.unet.modules())


def test_preserve_is_refused(tokenizer_dir):
    with pytest.raises(ValueError, match="no preserve set"):
        de.erase_concept(make_sd_pipeline(tokenizer_dir), "cat", method="esd", preserve=["dog"], **TINY)


@pytest.mark.parametrize("failure", ["nan", "interrupt"])
def test_a_diverged_or_interrupted_run_leaves_the_pipeline_as_it_was(tokenizer_dir, failure, monkeypatch):
    pipe = make_sd_pipeline(tokenizer_dir)
    de.erase_concept(pipe, "tree")  # an erasure already there must survive
    before, flags = snapshot(pipe), [p.requires_grad for p in pipe.unet.parameters()]
    if failure == "nan":
        def diverged(a, b):  # a loss gone NaN, as a too-large lr makes it
            return (a - b).pow(2).mean() * float("nan")

        monkeypatch.setattr("diffusers_erase.methods.esd.F", SimpleNamespace(mse_loss=diverged))
        with pytest.raises(FloatingPointError, match="iteration 0.*lower `lr`"):
            de.erase_concept(pipe, "cat", method="esd", **TINY)
    else:
        def interrupt(iteration, loss):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            de.erase_concept(pipe, "cat", method="esd", callback=interrupt, **TINY)
    assert changed(before, snapshot(pipe)) == [] and [e.concepts for e in de.get_erasures(pipe)] == [["tree"]]
    assert all(not m._forward_hooks for m in pipe.unet.modules())
    assert flags == [p.requires_grad for p in pipe.unet.parameters()]


def test_every_group_is_known_to_the_family_table():
    assert {"esd-x", "esd-x-strict", "esd-u", "esd-all", "mlp-final-attn", "text_encoder_full"} <= set(TRAIN_GROUPS)


def test_a_lora_rank_too_wide_for_a_later_layer_leaves_no_hook(tokenizer_dir):
    """The refusal comes part-way through hooking: the layers hooked before it are unhooked again."""
    from diffusers_erase.families import matrix_shape

    pipe = make_sd_pipeline(tokenizer_dir)
    group = train_group(pipe, "esd-all")
    wide = next(n for n, m in group.items() if min(matrix_shape(m.weight)) >= 8)
    narrow = next(n for n, m in group.items() if min(matrix_shape(m.weight)) < 8)
    modules = {wide: group[wide], narrow: group[narrow]}  # hooked in this order
    with pytest.raises(ValueError, match="above the width"):
        _training.Trainable(modules, 8, torch.Generator().manual_seed(0))
    assert not group[wide]._forward_hooks and not group[narrow]._forward_hooks


def test_checkpointing_the_user_enabled_stays_enabled(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir)
    pipe.unet.enable_gradient_checkpointing()
    de.erase_concept(pipe, "cat", method="esd", gradient_checkpointing=True, **TINY)
    assert pipe.unet.is_gradient_checkpointing


def test_embedding_deltas_match_the_module_and_refuse_max_norm():
    """padding_idx: the padding row gets no gradient, as in the module; max_norm is not linear in the weight."""
    embedding = torch.nn.Embedding(5, 3, padding_idx=0)
    trainable = _training.Trainable({"e": embedding}, None, torch.Generator().manual_seed(0))
    embedding(torch.tensor([0, 2])).sum().backward()
    grad = trainable.deltas["e"]["weight"].grad
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() > 0
    trainable.remove()
    with pytest.raises(ValueError, match="max_norm"):
        _training.Trainable({"e": torch.nn.Embedding(5, 3, max_norm=1.0)}, None, torch.Generator())


def test_a_trained_adapter_loads_only_onto_its_own_group(tokenizer_dir, tmp_path):
    """The load scope is the recorded train_method's group: a payload outside it is refused, and a pipeline without
    a text encoder still loads a UNet-only edit."""
    import dataclasses

    from diffusers_erase.api import adapter_state_dict

    pipe = make_sd_pipeline(tokenizer_dir)
    record = de.erase_concept(pipe, "cat", method="esd", train_method="esd-x-strict", **TINY)
    path = de.save_erasure_adapter(pipe, tmp_path)
    outside = next(n for n in train_group(pipe, "esd-x") if n.endswith("attn2.to_q"))  # esd-x, not esd-x-strict
    weight = pipe.unet.get_submodule(outside.partition(".")[2]).weight
    stray = dataclasses.replace(record, edit=dataclasses.replace(
        record.edit, deltas={f"{outside}.weight": de.Dense(torch.zeros_like(weight))}))
    tensors, metadata = adapter_state_dict(pipe, [stray])
    fresh = make_sd_pipeline(tokenizer_dir)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="not a parameter a trained method may edit"):
        de.load_erasure_adapter(fresh, tensors, metadata=metadata)
    assert changed(before, snapshot(fresh)) == [] and de.get_erasures(fresh) == []
    no_text = make_sd_pipeline(tokenizer_dir)
    no_text.text_encoder = None
    de.load_erasure_adapter(no_text, path)
    assert [e.method for e in de.get_erasures(no_text)] == ["esd"]


DATA_PARALLEL_SCRIPT = '''
import json
import sys

import torch
from accelerate import PartialState

import diffusers_erase as de
from diffusers_erase import shapes

pipe = shapes.load_pipeline()
losses = []
record = de.erase_concept(pipe, "circle", method="esd", iterations=3, lr=1e-3, ddim_steps=3,
                          callback=lambda i, loss: losses.append(loss))
rank = PartialState().process_index
torch.save({n: d.delta for n, d in record.edit.deltas.items()}, f"{sys.argv[1]}.{rank}.pt")
refused = None
if PartialState().num_processes > 1:  # a sweep giving each process its own concept is refused on every process
    try:
        de.erase_concept(pipe, ["circle", "square"][rank], method="esd", iterations=1, lr=1e-3, ddim_steps=3)
    except ValueError as error:
        refused = str(error)
open(f"{sys.argv[1]}.{rank}.json", "w").write(json.dumps({"processes": PartialState().num_processes,
                                                           "losses": losses, "refused": refused}))
'''


def test_two_processes_train_data_parallel_to_one_edit(tmp_path):
    """`torchrun --nproc_per_node 2` on the shapes model: each process draws its own x_t, the gradients are averaged
    every step, so both end with the same edit and loss curve, which is not the one-process run's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "esd.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, out in ((["-m", "torch.distributed.run", "--nproc_per_node", "2"], "parallel"), ([], "single")):
        subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / out)], check=True, env=env,
                       capture_output=True, timeout=600, cwd=tmp_path)
    import json

    runs = {name: (torch.load(tmp_path / f"{name}.pt"), json.loads((tmp_path / f"{name}.json").read_text()))
            for name in ("parallel.0", "parallel.1", "single.0")}
    (first, log0), (second, log1), (single, log) = runs.values()
    assert (log0["processes"], log1["processes"], log["processes"]) == (2, 2, 1)
    assert first.keys() == second.keys() == single.keys()
    assert all(torch.equal(first[n], second[n]) for n in first) and log0["losses"] == log1["losses"]
    assert any(not torch.equal(first[n], single[n]) for n in first) and log0["losses"] != log["losses"]
    assert all("different runs" in (entry["refused"] or "") for entry in (log0, log1))
