"""A stand-in for ComfyUI's `comfy_api.latest` (V3 node API), for testing the node pack without ComfyUI.

Written for these tests from a reading of ComfyUI v0.3.64 (Comfy-Org/ComfyUI a125cd84, 2025-10-12), not copied.
It keeps the constructor signatures of the types our nodes use (so a misspelt keyword fails here as there), and
every check ComfyUI applies to a node when `nodes.load_custom_node` registers a V3 extension:

`nodes.py` `load_custom_node`:
  L0. A module whose `NODE_CLASS_MAPPINGS` is not None is registered from those (and its
      `NODE_DISPLAY_NAME_MAPPINGS`) and True returned; its `comfy_entrypoint`, if any, is never looked at.
  L1. `comfy_entrypoint` must be callable (awaited when a coroutine function).
  L2. It must return a `ComfyExtension` instance.
  L3. `await extension.get_node_list()` must return a `list`.
  L4. For each node class `GET_SCHEMA()`; the node is registered under `schema.node_id`, its display name under
      `schema.display_name` when that is not None. An exception in L1-L4 is logged as a warning and False returned
      (the nodes registered before it stay registered).

`comfy_api/latest/_io.py` `_ComfyNodeBaseInternal.GET_SCHEMA` = `VALIDATE_CLASS`, `define_schema()`,
`Schema.finalize`, `Schema.validate`, then the V1 attributes (output names: `display_name`, else the io type):
  C1. `VALIDATE_CLASS`: the class overrides `define_schema` (else "No define_schema function was defined for
      node class ...").
  C2. ... and `execute` (else "No execute function was defined for node class ..."), checked with
      `comfy_api/internal/__init__.py` `first_real_override` (an override somewhere below the base class).
  F1. `Schema.finalize`: an output without id gets the id `_{index}_{io_type}_` (before validation).
  F2. ... `is_api_node` adds the hidden `auth_token_comfy_org` and `api_key_comfy_org`; `is_output_node` adds
      `prompt` and `extra_pnginfo` (no checks, only hidden inputs).
  V1. `Schema.validate`: input ids unique ("Input ids must be unique, but [...] are not.").
  V2. ... output ids unique ("Output ids must be unique, but [...] are not.").
  V3. ... no id both an input's and an output's ("Ids must be unique between inputs and outputs, but {...} are
      not."). All issues found are joined by newlines into one ValueError.
Nothing else is checked there: not the node id's form, display names, categories, or defaults against min/max.
"""

from __future__ import annotations

import inspect
import sys
import types
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from typing import Any

# --- inputs and outputs (`_io.py`: Input, WidgetInput, Output and the comfytype classes) ------------------------


class Input:
    io_type: str = None

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.extra_dict = extra_dict or {}


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None, socketless: bool = None, widget_type: str = None, force_input: bool = None,
                 extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default, self.socketless, self.widget_type = default, socketless, widget_type
        self.force_input = force_input


class Output:
    io_type: str = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _io_type(name: str, input_base=Input, output_base=Output, **inputs):
    """A ComfyType namespace class (`Model`, `Float`, ...) whose Input/Output carry `io_type`."""
    namespace = {"io_type": name, "Input": type("Input", (input_base,), {"io_type": name, **inputs}),
                 "Output": type("Output", (output_base,), {"io_type": name})}
    return type(name.title(), (), namespace)


class _FloatInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: float = None, min: float = None, max: float = None, step: float = None,
                 round: float = None, display_mode=None, socketless: bool = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.min, self.max, self.step, self.round, self.display_mode = min, max, step, round, display_mode


class _StringInput(WidgetInput):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 multiline=False, placeholder: str = None, default: str = None, dynamic_prompts: bool = None,
                 socketless: bool = None, force_input: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
        self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts


class _ComboInput(WidgetInput):
    def __init__(self, id: str, options=None, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default=None, control_after_generate: bool = None, upload=None,
                 image_folder=None, remote=None, socketless: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
        self.options, self.multiselect = options, False


class _ComboOutput(Output):
    def __init__(self, id: str = None, display_name: str = None, options: list[str] = None, tooltip: str = None,
                 is_output_list=False):
        super().__init__(id, display_name, tooltip, is_output_list)
        self.options = options or []


Model, Clip = _io_type("MODEL"), _io_type("CLIP")
Float = _io_type("FLOAT", _FloatInput)
String = _io_type("STRING", _StringInput)
Combo = _io_type("COMBO", _ComboInput, _ComboOutput)

# --- the schema (`_io.py` Schema: fields, finalize, validate) ---------------------------------------------------


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def finalize(self):  # F1, F2
        extra = (["auth_token_comfy_org", "api_key_comfy_org"] if self.is_api_node else []) + (
            ["prompt", "extra_pnginfo"] if self.is_output_node else [])
        if extra:
            self.hidden = (self.hidden or []) + [h for h in extra if h not in (self.hidden or [])]
        for index, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{index}_{output.io_type}_"

    def validate(self):  # V1, V2, V3
        inputs = [port.id for port in self.inputs or []]
        outputs = [port.id for port in self.outputs or []]
        issues = []
        for kind, ids in (("Input", inputs), ("Output", outputs)):
            repeated = [port_id for port_id, count in Counter(ids).items() if count > 1]
            if repeated:
                issues.append(f"{kind} ids must be unique, but {repeated} are not.")
        shared = set(inputs) & set(outputs)
        if shared:
            issues.append(f"Ids must be unique between inputs and outputs, but {shared} are not.")
        if issues:
            raise ValueError("\n".join(issues))


# --- nodes and extensions (`_io.py` ComfyNode, NodeOutput; `latest/__init__.py` ComfyExtension) -----------------


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args or None

    def __getitem__(self, index):  # indexable, hence unpackable like the V1 tuple: `(model,) = Node.execute(...)`
        return self.args[index]


class ComfyNode:
    SCHEMA = None

    @classmethod
    @abstractmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def VALIDATE_CLASS(cls):  # C1, C2
        for name in ("define_schema", "execute"):
            placeholder = ComfyNode.__dict__[name].__func__
            overridden = any(name in c.__dict__ and getattr(c, name).__func__ is not placeholder
                             for c in cls.mro()[: cls.mro().index(ComfyNode)])
            if not overridden:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        cls.VALIDATE_CLASS()
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        cls.RETURN_TYPES = tuple(port.io_type for port in schema.outputs or [])
        cls.RETURN_NAMES = tuple(port.display_name or port.io_type for port in schema.outputs or [])
        cls.SCHEMA = schema
        return schema


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 (ComfyUI's is empty and not abstract)
        return None

    @abstractmethod
    async def get_node_list(self) -> list[type[ComfyNode]]:
        ...


io = types.SimpleNamespace(Input=Input, WidgetInput=WidgetInput, Output=Output, Schema=Schema, ComfyNode=ComfyNode,
                           NodeOutput=NodeOutput, Model=Model, Clip=Clip, Float=Float, String=String, Combo=Combo)


def _forget_the_pack(monkeypatch):
    """Drop `diffusers_erase.comfyui` (and `.v3`) from sys.modules, so the next import runs them again; the
    test's end puts the originals back."""
    import diffusers_erase

    monkeypatch.setattr(diffusers_erase, "comfyui", getattr(diffusers_erase, "comfyui", None), raising=False)
    for name in ("diffusers_erase.comfyui", "diffusers_erase.comfyui.v3"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def install(monkeypatch):
    """Put this stand-in at `comfy_api` / `comfy_api.latest` for the test, and forget our modules that read it."""
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.__path__ = []
    package.__spec__ = ModuleSpec("comfy_api", None, is_package=True)  # what find_spec("comfy_api") returns
    package.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", package)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    _forget_the_pack(monkeypatch)


def uninstall(monkeypatch):
    """A Python without `comfy_api` (even inside a ComfyUI) for the test, and forget our modules that read it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "comfy_api" else find_spec(name, *args))
    _forget_the_pack(monkeypatch)


async def load_custom_node(namespace: dict) -> tuple[bool, dict[str, type], dict[str, str], str | None]:
    """ComfyUI's `load_custom_node` registration (L0-L4) of a module with these names (what
    `from diffusers_erase.comfyui import *` gives the custom node's `__init__.py`):
    `(loaded, {node id: class}, {node id: display name}, warning or None)`."""
    classes, names = {}, {}
    if namespace.get("NODE_CLASS_MAPPINGS") is not None:  # L0
        names = dict(namespace.get("NODE_DISPLAY_NAME_MAPPINGS") or {})
        return True, dict(namespace["NODE_CLASS_MAPPINGS"]), names, None
    if "comfy_entrypoint" not in namespace:
        return False, classes, names, "lacks NODE_CLASS_MAPPINGS or NODES_LIST"
    entrypoint = namespace["comfy_entrypoint"]
    if not callable(entrypoint):
        return False, classes, names, "comfy_entrypoint is not callable"
    try:
        extension = await entrypoint() if inspect.iscoroutinefunction(entrypoint) else entrypoint()
        if not isinstance(extension, ComfyExtension):
            return False, classes, names, "comfy_entrypoint did not return a ComfyExtension"
        node_list = await extension.get_node_list()
        if not isinstance(node_list, list):
            return False, classes, names, "comfy_entrypoint did not return a list of nodes"
        for node in node_list:
            schema = node.GET_SCHEMA()
            classes[schema.node_id] = node
            if schema.display_name is not None:
                names[schema.node_id] = schema.display_name
        return True, classes, names, None
    except Exception as error:  # the nodes registered before the failure stay registered
        return False, classes, names, f"Error while calling comfy_entrypoint: {error}"
