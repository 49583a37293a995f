"""Fuzz suite: generated bad input, each case held to the product's promise.

Every case is a mutation of something valid: an adapter file in each format we read (truncated, header JSON
mutated field by field and type by type, tensors relabelled, reshaped, filled with NaN/inf/huge values, tensors
missing or extra, another family), an API argument, or a CLI command line. A case passes when either

- it is refused with `ValueError`/`TypeError`/`OSError`/`FloatingPointError` whose message names the file, key
  or argument at fault, and every weight, record, hook and `requires_grad` is as before; or
- (mutations that may be valid, e.g. a different number in `options`) it is accepted, its records are
  well-formed, every weight stays finite and `unload_erasure()` restores the pipeline bit-exactly.

The default run is seeded and samples a few hundred cases (under a minute); `--fuzz-full` runs them all.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_sd_pipeline, make_sdxl_pipeline
from safetensors.torch import load_file, save_file

import diffusers_erase as de
from diffusers_erase import cli
from diffusers_erase.state import state

CLEAN_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
TINY_SPM = dict(iterations=2, lr=1e-2, max_denoising_steps=3, la_samples=1)
DEFAULT_BUDGET = {"truncate": 16, "header": 90, "tensor": 32, "keys": 12}


@dataclass
class Case:
    name: str
    path: Path
    must_refuse: bool  # False: the mutation may be valid; if accepted it must still be sane


# ------------------------------------------------------------------------------------------- the pipeline's state


def pipeline_state(pipe) -> dict:
    """Everything a failed call must leave as it was."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, p in module.named_parameters():
            out[f"{component}.{name}"] = (p.detach().clone(), p.requires_grad)
        out[f"{component}.hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    erasure_state = state(pipe)
    out["erasures"] = [id(e) for e in erasure_state.erasures]
    out["edits"] = [(e.edit.kind, getattr(e.edit, "weight", None), getattr(e.edit, "gated", None))
                    for e in erasure_state.erasures]
    out["originals"] = sorted(erasure_state.originals)
    return out


def differences(before: dict, after: dict) -> list[str]:
    diff = []
    for key, value in before.items():
        other = after.get(key)
        if isinstance(value, tuple):
            if other is None or not torch.equal(value[0], other[0]) or value[1] != other[1]:
                diff.append(key)
        elif value != other:
            diff.append(key)
    return diff


def assert_well_formed(erasure) -> None:
    assert isinstance(erasure.method, str) and erasure.method
    for name in ("concepts", "anchors", "preserve"):
        values = getattr(erasure, name)
        assert isinstance(values, list) and all(isinstance(v, str) for v in values), (name, values)
    assert isinstance(erasure.options, dict)
    assert isinstance(erasure.seconds, float) and math.isfinite(erasure.seconds) and erasure.seconds >= 0
    assert erasure.name is None or isinstance(erasure.name, str)
    for delta in erasure.edit.deltas.values():
        for tensor in delta.tensors().values():
            assert tensor.is_floating_point() and torch.isfinite(tensor).all()


def check_case(pipe, call, names, must_refuse: bool, what: str) -> str | None:
    """Run `call()`; None when the promise held, else what went wrong."""
    before = pipeline_state(pipe)
    try:
        result = call()
    except CLEAN_ERRORS as error:
        message = str(error)
        if differences(before, pipeline_state(pipe)):
            return f"{what}: refused but changed {differences(before, pipeline_state(pipe))[:3]}"
        if not any(n in message for n in names):
            return f"{what}: message names none of {names}: {type(error).__name__}: {message[:200]}"
        return None
    except Exception as error:  # noqa: BLE001 - the point: any other exception is a failure
        state_changed = differences(before, pipeline_state(pipe))
        return f"{what}: {type(error).__name__}: {str(error)[:160]}" + (f" (changed {state_changed[:3]})"
                                                                        if state_changed else "")
    problems = []
    try:
        if must_refuse:
            problems.append("accepted")
        for erasure in result if isinstance(result, list) else []:
            assert_well_formed(erasure)
        for key, (value, _) in ((k, v) for k, v in pipeline_state(pipe).items() if isinstance(v, tuple)):
            if value.is_floating_point() and not torch.isfinite(value).all():
                problems.append(f"non-finite {key}")
                break
    except AssertionError as error:
        problems.append(f"malformed record {error}")
    finally:
        de.unload_erasure(pipe)
        if differences(before, pipeline_state(pipe)):
            problems.append(f"unload not exact: {differences(before, pipeline_state(pipe))[:3]}")
    return f"{what}: " + "; ".join(problems) if problems else None


# ----------------------------------------------------------------------------------------------- valid adapters


def _save(tensors, metadata, path: Path) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def fuzz_pipe(tokenizer_dir):
    return make_sd_pipeline(tokenizer_dir)


@pytest.fixture(scope="module")
def valid_files(fuzz_pipe, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """One valid adapter per format we read, all for `fuzz_pipe`."""
    folder = tmp_path_factory.mktemp("valid")
    pipe = fuzz_pipe
    files = {}
    de.erase_concept(pipe, "cat", anchor="dog", preserve=["a house"])
    files["native_uce"] = de.save_erasure_adapter(pipe, folder / "uce", weight_name="native_uce.safetensors")
    files["kohya"] = de.export_adapter(pipe, folder / "kohya.safetensors", format="kohya")
    files["diff"] = de.export_adapter(pipe, folder / "diff.safetensors", format="diff")
    files["lora_v1"] = de.export_adapter(pipe, folder / "lora_v1.safetensors", format="lora")
    peft_dir = de.export_peft(pipe, folder / "peft")
    files["peft"] = peft_dir / "adapter_model.safetensors"
    partial = {f"{name[len('unet.'):]}.weight": m.weight.detach().clone()
               for name, m in de.families.text_readers(pipe).items()}
    files["partial"] = _save(partial, {}, folder / "partial.safetensors")
    de.unload_erasure(pipe)
    de.erase_concept(pipe, "cat", method="spm", **TINY_SPM)
    files["native_spm"] = de.save_erasure_adapter(pipe, folder / "spm", weight_name="native_spm.safetensors")
    kohya_spm = de.export_adapter(pipe, folder / "kohya_spm_ours.safetensors", format="kohya")
    tensors = load_file(str(kohya_spm))
    files["kohya_spm"] = _save(tensors, {"prompts": "cat", "rank": "1", "alpha": "1"},
                               folder / "kohya_spm.safetensors")
    de.unload_erasure(pipe)
    for path in files.values():  # each loads and unloads cleanly as it is
        de.load_erasure_adapter(pipe, str(path))
        de.unload_erasure(pipe)
    return files


# ------------------------------------------------------------------------------------- safetensors file surgery


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + size]), raw[8 + size:]


def join_file(header: dict, data: bytes, path: Path) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _json_paths(value, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from _json_paths(item, (*prefix, index))


REPLACEMENTS = [None, 0, -1, 1.5, float("inf"), float("nan"), "x", "", True, [], {}, [5], ["x"], {"a": 1}]


def _set(root, path, value, delete=False):
    node = root
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


def _may_be_valid(path, value) -> bool:
    """Mutations a loader may accept: informational fields given another value of a sensible type."""
    head = path[-1] if path else None
    if len(path) >= 2 and path[-2] == "options" or "options" in path:
        return True  # a record of what was run; any JSON is kept as it is
    if head in ("library_version", "base_model", "name", "token_policy", "seconds", "text_fingerprints",
                "fingerprints", "preserve_sha256", "preserve_count"):
        return True  # informational; validated for type when used
    if {"fingerprints", "text_fingerprints"} & set(path):
        return True  # informational; validated for type when used
    if head in ("anchors", "preserve") and value in ([], ["x"]):
        return True
    if head == "method" and value == "x":
        return True  # a method this version does not know: its kind's default scope applies
    if head == "concepts" and value in ([], ["x"]):
        return True  # imported edits name no concept
    if isinstance(head, int) and len(path) >= 2 and path[-2] in ("concepts", "anchors", "preserve", "prompts"):
        return value == "x" or (value == "" and path[-2] in ("anchors", "preserve"))
    if head == "weight" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return True
    if head == "gate_power" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
            value) and value > 0:
        return True
    if head in ("gated", "fused") and isinstance(value, bool):
        return True
    if head == "prompts" and value == ["x"]:
        return True
    return False


_OPTIONAL_FIELDS = ("library_version", "base_model", "name", "token_policy", "seconds", "options", "anchors",
                    "preserve", "fingerprints", "text_fingerprints", "gated", "fused", "weight", "gate_power")


def _deletable(path, header) -> bool:
    """Fields a loader may do without (they have defaults), and entries of lists that may be shorter."""
    if path[-1] in _OPTIONAL_FIELDS or any(p in ("options", "fingerprints", "text_fingerprints") for p in path[:-1]):
        return True
    if isinstance(path[-1], int) and path[-2] in ("concepts", "anchors", "preserve"):
        return True
    if path[-1] in ("kind", "rank") and header.get("format_version") == 2:
        return True  # format 2 infers the kind from the record and the rank from the payloads; format 1 needs rank
    return path == ("format_version",) and header.get("format_version") == 1  # absent means format 1


def header_cases(path: Path, out: Path, label: str) -> list[Case]:
    header, data = split_file(path)
    metadata = header.get("__metadata__", {})
    cases = []
    if "diffusers_erase" not in metadata:
        for key in list(metadata):
            for value in ("", "x", "sdxl_base_v1-0", "[]"):
                mutated = json.loads(json.dumps(header))
                mutated["__metadata__"][key] = value
                informational = key in ("ss_output_name", "rank", "alpha") or (key == "prompts" and value != "")
                cases.append((f"{label}: metadata {key}={value!r}", mutated, informational))
        return [Case(name, join_file(h, data, out / f"h{i}.safetensors"), not ok)
                for i, (name, h, ok) in enumerate(cases)]
    ours = json.loads(metadata["diffusers_erase"])
    for top in ("[]", "null", "1", '"x"', "{}", "{", ""):
        mutated = json.loads(json.dumps(header))
        mutated["__metadata__"]["diffusers_erase"] = top
        cases.append((f"{label}: header = {top!r}", mutated, False))
    for json_path, _ in _json_paths(ours):
        if not json_path:
            continue
        for value in [*REPLACEMENTS, "<delete>"]:
            copy = json.loads(json.dumps(ours))
            _set(copy, json_path, value, delete=value == "<delete>")
            mutated = json.loads(json.dumps(header))
            mutated["__metadata__"]["diffusers_erase"] = json.dumps(copy)
            ok = _deletable(json_path, ours) if value == "<delete>" else _may_be_valid(json_path, value)
            cases.append((f"{label}: {'.'.join(map(str, json_path))} = {value!r}", mutated, ok))
    records = ours.get("erasures", [])
    if records:
        copy = json.loads(json.dumps(ours))
        copy["erasures"] = records + records  # the same record twice: its tensors are used twice
        mutated = json.loads(json.dumps(header))
        mutated["__metadata__"]["diffusers_erase"] = json.dumps(copy)
        # A .diff sums every record into one edit, so a repeated record is only a repeated claim.
        cases.append((f"{label}: duplicated record", mutated, label == "diff"))
    return [Case(name, join_file(h, data, out / f"h{i}.safetensors"), not ok)
            for i, (name, h, ok) in enumerate(cases)]


def tensor_cases(path: Path, out: Path, label: str) -> list[Case]:
    header, data = split_file(path)
    cases = []
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        entry = header[name]
        for dtype in ("I32", "I64", "BOOL", "U8", "F16", "I8"):
            mutated = json.loads(json.dumps(header))
            mutated[name]["dtype"] = dtype
            cases.append((f"{label}: {name} relabelled {dtype}", mutated, data))
        shape = entry["shape"]
        for new_shape in ([], [*shape, 1][:4] if len(shape) < 4 else shape[:-1], shape[::-1]):
            if new_shape == shape or math.prod(new_shape or [1]) != math.prod(shape or [1]):
                continue
            mutated = json.loads(json.dumps(header))
            mutated[name]["shape"] = new_shape
            cases.append((f"{label}: {name} reshaped {new_shape}", mutated, data))
    # A 1-element alpha, or an integer one (converters write torch.tensor(rank)), is valid kohya: its value is only
    # a scale, and the weight bound refuses any scale that would take a weight out of range.
    results = [Case(n, join_file(h, d, out / f"t{i}.safetensors"),
                    not (".alpha reshaped [1]" in n or n.endswith((".alpha relabelled I32", ".alpha relabelled I64",
                                                                  ".alpha relabelled U8", ".alpha relabelled I8"))))
               for i, (n, h, d) in enumerate(cases)]
    tensors = load_file(str(path))
    metadata = header.get("__metadata__", {})
    for name in names:
        for value in (float("nan"), float("inf"), float("-inf"), 1e20, 3e38):
            changed = dict(tensors)
            changed[name] = torch.full_like(tensors[name], value)
            file = _save(changed, metadata, out / f"v{len(results)}.safetensors")
            results.append(Case(f"{label}: {name} all {value}", file, True))
        one = dict(tensors)
        flat = tensors[name].clone().reshape(-1)
        flat[len(flat) // 2] = float("nan")
        one[name] = flat.reshape(tensors[name].shape)
        results.append(Case(f"{label}: {name} one NaN", _save(one, metadata, out / f"v{len(results)}.safetensors"),
                            True))
    return results


def key_cases(path: Path, out: Path, label: str, pipe) -> list[Case]:
    tensors = load_file(str(path))
    header, _ = split_file(path)
    metadata = header.get("__metadata__", {})
    results = []
    for name in list(tensors)[:4]:
        fewer = {k: v for k, v in tensors.items() if k != name}
        if fewer:
            optional = name.endswith(".alpha") or label == "partial"  # alpha defaults to the rank; any subset
            results.append(Case(f"{label}: without {name}", _save(fewer, metadata, out / f"k{len(results)}.st"),
                                not optional))
        renamed = {(f"zz{k}" if k == name else k): v for k, v in tensors.items()}  # a module no pipeline has
        results.append(Case(f"{label}: {name} renamed", _save(renamed, metadata, out / f"k{len(results)}.st"),
                            True))
    extra = {**tensors, "zz.extra": torch.zeros(2, 2)}
    results.append(Case(f"{label}: extra tensor", _save(extra, metadata, out / f"k{len(results)}.st"), True))
    results.append(Case(f"{label}: no tensors", _save({}, metadata, out / f"k{len(results)}.st"), True))
    return results


def truncate_cases(path: Path, out: Path, label: str, count: int, rng) -> list[Case]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    fixed = {0, 1, 7, 8, 9, 8 + size // 2, 8 + size - 1, 8 + size, 8 + size + 1, len(raw) - 1}
    offsets = sorted(fixed | {rng.randrange(1, len(raw)) for _ in range(max(0, count - len(fixed)))})
    results = []
    for offset in offsets:
        file = out / f"cut{offset}.safetensors"
        file.write_bytes(raw[:offset])
        results.append(Case(f"{label}: truncated at {offset}/{len(raw)}", file, True))
    return results


def _log(request, label, report, failures):
    """`FUZZ_LOG=<file>` appends each test's count and failures (the numbers quoted in the issue notes)."""
    path = os.environ.get("FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": label, "cases": len(report), "failed": failures}) + "\n")


def _sample(cases, budget, rng, full):
    return cases if full or len(cases) <= budget else rng.sample(cases, budget)


def _run(pipe, cases, report):
    failures = []
    for case in cases:
        names = [case.path.name, str(case.path)]
        problem = check_case(pipe, lambda path=case.path: de.load_erasure_adapter(pipe, str(path)), names,
                             case.must_refuse, case.name)
        report.append(problem is None)
        if problem:
            failures.append(problem)
    return failures


FORMATS = ["native_uce", "native_spm", "kohya", "kohya_spm", "diff", "lora_v1", "peft", "partial"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_adapter_files(fmt, fuzz_pipe, valid_files, tmp_path, request):
    full = request.config.getoption("--fuzz-full")
    rng = random.Random(f"fuzz-{fmt}")
    path = valid_files[fmt]
    groups = {
        "truncate": truncate_cases(path, tmp_path, fmt, DEFAULT_BUDGET["truncate"] if not full else 64, rng),
        "header": header_cases(path, tmp_path, fmt),
        "tensor": tensor_cases(path, tmp_path, fmt),
        "keys": key_cases(path, tmp_path, fmt, fuzz_pipe),
    }
    report, failures = [], []
    for group, cases in groups.items():
        failures += _run(fuzz_pipe, _sample(cases, DEFAULT_BUDGET[group], rng, full), report)
    _log(request, fmt, report, failures)
    assert not failures, f"{len(failures)} of {len(report)} cases failed:\n" + "\n".join(failures[:40])


def test_adapters_of_another_family_are_refused(valid_files, tokenizer_dir):
    sdxl = make_sdxl_pipeline(tokenizer_dir)
    failures = []
    for fmt in FORMATS:
        path = valid_files[fmt]
        problem = check_case(sdxl, lambda path=path: de.load_erasure_adapter(sdxl, str(path)),
                             [path.name, str(path)], True, f"{fmt} into sdxl")
        if problem:
            failures.append(problem)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ importers: named cases


KOHYA_DEFECTS = {  # (down, up) of one module -> the tensors that replace them
    "2-element alpha": lambda down, up: {"alpha": torch.tensor([1.0, 1.0])},
    "NaN alpha": lambda down, up: {"alpha": torch.tensor(float("nan"))},
    "bool alpha": lambda down, up: {"alpha": torch.tensor(True)},
    "rank-0 factors": lambda down, up: {"lora_down.weight": down[:0], "lora_up.weight": up[:, :0]},
    "down rank 2, up rank 1": lambda down, up: {"lora_down.weight": torch.cat([down, down])},
    "up with an extra column": lambda down, up: {"lora_up.weight": torch.cat([up, up], dim=1)},
    "bool factors": lambda down, up: {"lora_down.weight": down > 0},
}


def importer_cases(valid_files, out: Path) -> list[Case]:
    """The importer defects the hardening issue lists, each as a file."""
    cases = []
    for variant in ("kohya", "kohya_spm"):
        source = load_file(str(valid_files[variant]))
        metadata = split_file(valid_files[variant])[0].get("__metadata__", {})
        base = sorted({k.partition(".")[0] for k in source})[0]
        down, up = source[f"{base}.lora_down.weight"], source[f"{base}.lora_up.weight"]
        for name, defect in KOHYA_DEFECTS.items():
            change = {f"{base}.{part}": value for part, value in defect(down, up).items()}
            file = _save({**source, **change}, metadata, out / f"i{len(cases)}.safetensors")
            cases.append(Case(f"{variant}: {name}", file, True))
    diff = load_file(str(valid_files["diff"]))
    key = sorted(diff)[0]
    diff_metadata = split_file(valid_files["diff"])[0].get("__metadata__", {})
    for name, value in {"0-d diff": torch.tensor(1.0), "empty diff": torch.zeros(0),
                        "int8 diff": diff[key].to(torch.int8)}.items():
        file = _save({**diff, key: value}, diff_metadata, out / f"i{len(cases)}.safetensors")
        cases.append(Case(f"diff: {name}", file, True))
    partial = load_file(str(valid_files["partial"]))
    key = sorted(partial)[0]
    for name, value in {"int8 weights": partial[key].to(torch.int8), "0-d weight": torch.tensor(1.0),
                        "transposed": partial[key].T.contiguous()}.items():
        file = _save({**partial, key: value}, {}, out / f"i{len(cases)}.safetensors")
        cases.append(Case(f"partial: {name}", file, True))
    return cases


def test_importer_defects_are_refused_cleanly(fuzz_pipe, valid_files, tmp_path):
    cases = importer_cases(valid_files, tmp_path)
    failures = _run(fuzz_pipe, cases, report := [])
    _log_plain("importers", report, failures)
    assert not failures, "\n".join(failures)


def _log_plain(label, report, failures):
    path = os.environ.get("FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": label, "cases": len(report), "failed": failures}) + "\n")


# ------------------------------------------------------------------------------------------------ API arguments

BAD_NUMBERS = [float("inf"), float("nan"), "x", None, True, [1.0]]
OPTION_CASES = {  # method -> {option: invalid values}
    # preserve_scale=None is the legacy max(0.1, 1/N)
    "uce": {"lamb": [*BAD_NUMBERS, -1.0], "erase_scale": [*BAD_NUMBERS, 0.0],
            "preserve_scale": [v for v in BAD_NUMBERS if v is not None],
            "token_policy": [5, None, "first"]},
    "rece": {"epochs": [1.5, -1, True, "x"], "reg": BAD_NUMBERS, "adv_lamb": BAD_NUMBERS, "epoch_callback": [5, "x"]},
    "spm": {"lr": [*BAD_NUMBERS, 0.0], "alpha": BAD_NUMBERS, "la_strength": BAD_NUMBERS,
            "sampling_guidance": BAD_NUMBERS, "erase_guidance": BAD_NUMBERS, "max_grad_norm": BAD_NUMBERS,
            "seed": ["x", -1, 1.5, None], "resolution": [-8, "x", 3, 0, True], "callback": [5, "x"],
            "lr_warmup_steps": [-5, 1.5], "lr_cycles": [-1, 0], "la_samples": [-1, "x"], "rank": [0, True, 1.5],
            "iterations": [0, True, "x"], "max_denoising_steps": [1, "x"]},
}


def api_cases(pipe, folder: Path):
    """(name, call, words one of which the message must hold) for wrong API arguments; `folder` is where a save
    that wrongly succeeded would write."""
    cases = []
    for concepts in (5, None, b"cat", ["cat", 5], {"cat"}, [], "", ["cat", " "]):
        cases.append((f"concepts={concepts!r}", lambda c=concepts: de.erase_concept(pipe, c), ["concept"]))
    for anchor in (5, [5], ["a", "b"], []):
        cases.append((f"anchor={anchor!r}", lambda a=anchor: de.erase_concept(pipe, "cat", anchor=a), ["anchor"]))
    for preserve in (5, [None], "cat"):
        cases.append((f"preserve={preserve!r}", lambda p=preserve: de.erase_concept(pipe, "cat", preserve=p),
                      ["preserve"]))
    for method in (["uce"], 5, None, "", "ucee"):
        cases.append((f"method={method!r}", lambda m=method: de.erase_concept(pipe, "cat", method=m), ["method"]))
    for name in (5, "", ["a"]):
        cases.append((f"adapter_name={name!r}", lambda n=name: de.erase_concept(pipe, "cat", adapter_name=n),
                      ["adapter_name"]))
    for method, options in OPTION_CASES.items():
        for option, values in options.items():
            for value in values:
                cases.append((f"{method} {option}={value!r}",
                              lambda m=method, o=option, v=value: de.erase_concept(pipe, "cat", method=m, **{o: v}),
                              [option]))
    cases.append(("unknown option", lambda: de.erase_concept(pipe, "cat", lambda_=1), ["lambda_"]))
    for source in (5, None, ["x"]):
        cases.append((f"load {source!r}", lambda s=source: de.load_erasure_adapter(pipe, s),
                      ["pretrained_model_name_or_path_or_dict"]))
    for weight_name in ("adapter.bin", "../x.safetensors", "a/b.safetensors", 5):
        cases.append((f"save weight_name={weight_name!r}",
                      lambda w=weight_name: de.save_erasure_adapter(pipe, folder, weight_name=w),
                      ["weight_name"]))
    return cases


def membrane_cases(pipe):
    """Cases that need a membrane on the pipeline (loaded before each)."""
    cases = []
    for names in (5, [5], None, ["nope"]):
        cases.append((f"set_erasure_adapters({names!r})", lambda n=names: de.set_erasure_adapters(pipe, n),
                      ["adapter_names", "membrane named"]))
    for weights in (["x"], [float("nan")], float("inf"), [1.0, 2.0], "x", [None], [True], [1e30]):
        cases.append((f"weights={weights!r}", lambda w=weights: de.set_erasure_adapters(pipe, ["default"], weights=w),
                      ["weights"]))
    for gating in ("yes", 1, [True]):
        cases.append((f"gating={gating!r}", lambda g=gating: de.set_erasure_adapters(pipe, "default", gating=g),
                      ["gating"]))
    cases.append(("unconditional_gate=5", lambda: de.set_erasure_adapters(pipe, "default", unconditional_gate=5),
                  ["unconditional_gate"]))
    cases.append(("erasure_gates(5)", lambda: de.erasure_gates(pipe, 5), ["prompts"]))
    return cases


@pytest.fixture
def handlers_unreachable(monkeypatch):
    """Bad arguments must be refused before any work: a method handler reached is a failure."""
    from diffusers_erase import registry

    def reached(*args, **kwargs):
        raise AssertionError("the method handler ran: the argument was not checked first")

    for name, method in list(registry._METHODS.items()):
        monkeypatch.setitem(registry._METHODS, name, type(method)(method.name, method.config_cls, reached))


def test_wrong_api_arguments(fuzz_pipe, valid_files, handlers_unreachable, tmp_path):
    failures, report = [], []
    cases = api_cases(fuzz_pipe, tmp_path / "never-written")
    cases.append(("enable_erasure(None)", lambda: de.enable_erasure(None), ["pipeline"]))
    for name, call, words in cases:
        problem = check_case(fuzz_pipe, call, words, True, name)
        report.append(problem is None)
        failures += [problem] if problem else []
    de.load_erasure_adapter(fuzz_pipe, str(valid_files["native_spm"]))
    try:
        for name, call, words in membrane_cases(fuzz_pipe):
            before = pipeline_state(fuzz_pipe)
            try:
                call()
                problem = f"{name}: accepted"
            except CLEAN_ERRORS as error:
                problem = None if any(w in str(error) for w in words) else f"{name}: names none of {words}: {error}"
            except Exception as error:  # noqa: BLE001
                problem = f"{name}: {type(error).__name__}: {error}"
            if differences(before, pipeline_state(fuzz_pipe)):
                problem = f"{name}: changed {differences(before, pipeline_state(fuzz_pipe))[:3]}"
            report.append(problem is None)
            failures += [problem] if problem else []
    finally:
        de.unload_erasure(fuzz_pipe)
    _log_plain("api", report, failures)
    assert not failures, f"{len(failures)} of {len(report)} failed:\n" + "\n".join(failures)


def test_one_adapter_name_cannot_be_loaded_twice(fuzz_pipe, valid_files):
    de.load_erasure_adapter(fuzz_pipe, str(valid_files["native_uce"]), adapter_name="style")
    try:
        problem = check_case(fuzz_pipe, lambda: de.load_erasure_adapter(fuzz_pipe, str(valid_files["native_uce"]),
                                                                        adapter_name="style"),
                             ["adapter_name"], True, "same adapter_name twice")
        assert problem is None, problem
    finally:
        de.unload_erasure(fuzz_pipe)


def test_meta_device_pipelines_are_refused(tokenizer_dir):
    pipe = make_sd_pipeline(tokenizer_dir).to("meta")
    for call in (lambda: de.erase_concept(pipe, "cat"), lambda: de.load_erasure_adapter(pipe, {"x": torch.ones(1)})):
        with pytest.raises(ValueError, match="meta device"):
            call()


def test_erasure_gates_of_no_prompt(fuzz_pipe, valid_files):
    de.load_erasure_adapter(fuzz_pipe, str(valid_files["native_spm"]))
    try:
        assert de.erasure_gates(fuzz_pipe, []) == {"default": []}
    finally:
        de.unload_erasure(fuzz_pipe)


def test_a_damaged_preserve_cache_is_recomputed(fuzz_pipe, tmp_path, monkeypatch):
    from diffusers_erase import text

    monkeypatch.setenv("DIFFUSERS_ERASE_CACHE", str(tmp_path))
    gram, count = text.preserve_statistics(fuzz_pipe, ["a house"], "last_subject")
    (cached,) = tmp_path.glob("*.safetensors")
    for bad in ({"gram": torch.zeros(3, 3, dtype=torch.float64), "count": torch.tensor(1)},
                {"gram": gram.float(), "count": torch.tensor(count)},
                {"gram": gram * float("nan"), "count": torch.tensor(count)}):
        save_file(bad, str(cached))
        again, again_count = text.preserve_statistics(fuzz_pipe, ["a house"], "last_subject")
        assert torch.equal(again, gram) and again_count == count


# ------------------------------------------------------------------------------------------------------- CLI


def cli_cases(valid_files, out: Path):
    """(argv, words one of which the error line must hold); none of them may load a model."""
    header, data = split_file(valid_files["native_uce"])
    bad = {}
    for name, value in {"list": "[]", "garbled": "{", "incomplete": None}.items():
        mutated = json.loads(json.dumps(header))
        if value is None:
            ours = json.loads(mutated["__metadata__"]["diffusers_erase"])
            del ours["erasures"][0]["payloads"]
            value = json.dumps(ours)
        mutated["__metadata__"]["diffusers_erase"] = value
        bad[name] = join_file(mutated, data, out / f"{name}.safetensors")
    tensors = load_file(str(valid_files["native_uce"]))
    bad["nan"] = _save({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, header["__metadata__"],
                       out / "nan.safetensors")
    erase = ["erase", "shapes", "--concept", "circle", "--out", str(out / "never")]
    cases = [([*erase, "--device", device], ["--device"]) for device in ("banana", "meta", "cuda:99")]
    cases += [([*erase, "--option", option], [option.partition("=")[0]])
              for option in ("lamb=-1", "lamb=inf", "lambda=1", "token_policy=first", "erase_scale=x")]
    cases.append(([*erase[:3], " ", *erase[4:]], ["concepts"]))
    for file in bad.values():
        export = ["export", str(file), "--model", "shapes", "--format", "kohya", "--out", str(out / "k.safetensors")]
        cases += [(export, [file.name]),
                  (["card", str(file)], [file.name]),
                  (["evaluate", "--adapter", str(file), "--out", str(out / "e")], [file.name])]
    cases += [(["demo", "--concept", "circle", "--option", "lamb=-1", "--out", str(out / "d")], ["lamb"]),
              (["demo", "--images-per-prompt", "0", "--out", str(out / "d")], ["--images-per-prompt"])]
    return cases


def test_cli_misuse_is_one_line_before_any_model_load(valid_files, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_pipeline", no_model)
    failures, report = [], []
    for argv, words in cli_cases(valid_files, tmp_path):
        capsys.readouterr()
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:  # argparse's own refusal
            code = exit_info.code
        except Exception as error:  # noqa: BLE001
            code = f"{type(error).__name__}: {error}"
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        ok = code == 2 and "Traceback" not in err and any(w in err for w in words)
        report.append(ok)
        if not ok:
            failures.append(f"{' '.join(argv)}: exit {code}, stderr {lines[-1:] if lines else ''}")
    _log_plain("cli", report, failures)
    assert not failures, "\n".join(failures)
