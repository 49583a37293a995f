"""The same three nodes for ComfyUI's V3 node API (`comfy_api.latest`). Each schema declares the V1 node's inputs
under the V1 node id (saved workflows keep working) and `execute` calls the V1 node's code, so both APIs apply
the same math. This module imports only inside a ComfyUI that has the V3 API.

ComfyUI's `Schema.validate` (run by `ComfyNode.GET_SCHEMA` when the pack loads) wants every input and output id
unique within the node, inputs and outputs together, so no output is called "model". Output ids are not stored
in workflows (links name an output by its index), only the names shown on the node, which are the V1 ones."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes import (
    CATEGORY,
    NODE_DISPLAY_NAME_MAPPINGS,
    ApplyClosedFormErasure,
    ErasureGate,
    LoadErasureAdapter,
    _lora_files,
)

_STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
MODEL_OUT = "erased_model"  # the MODEL output's id: distinct from the "model" input's


def _schema(node_id: str, v1, inputs: list, outputs: list) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=NODE_DISPLAY_NAME_MAPPINGS[node_id], category=CATEGORY,
                     description=v1.__doc__, inputs=inputs, outputs=outputs)


class LoadErasureAdapterV3(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DiffusersEraseLoadAdapter", LoadErasureAdapter,
                       [io.Model.Input("model"), io.Combo.Input("adapter", options=_lora_files()),
                        io.Float.Input("strength", **_STRENGTH)],
                       [io.Model.Output(MODEL_OUT)])

    @classmethod
    def execute(cls, model, adapter, strength) -> io.NodeOutput:
        return io.NodeOutput(*LoadErasureAdapter().apply(model, adapter, strength))


class ErasureGateV3(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DiffusersEraseGate", ErasureGate,
                       [io.Model.Input("model"), io.Clip.Input("clip"),
                        io.Combo.Input("adapter", options=_lora_files()), io.String.Input("prompt", multiline=True),
                        io.Float.Input("strength", **_STRENGTH)],
                       [io.Model.Output(MODEL_OUT, display_name="model"),
                        io.Float.Output("gate", display_name="gate")])

    @classmethod
    def execute(cls, model, clip, adapter, prompt, strength) -> io.NodeOutput:
        return io.NodeOutput(*ErasureGate().apply(model, clip, adapter, prompt, strength))


class ApplyClosedFormErasureV3(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DiffusersEraseApplyClosedForm", ApplyClosedFormErasure,
                       [io.Model.Input("model"), io.Clip.Input("clip"),
                        io.String.Input("concepts", default="Van Gogh"), io.String.Input("anchor", default="art"),
                        io.String.Input("preserve", default="", multiline=True),
                        io.Float.Input("lamb", default=0.5, min=0.001, max=100.0, step=0.01),
                        io.Combo.Input("token_policy", options=["last_subject", "eot", "all"])],
                       [io.Model.Output(MODEL_OUT)])

    @classmethod
    def execute(cls, model, clip, concepts, anchor, preserve, lamb, token_policy="last_subject") -> io.NodeOutput:
        return io.NodeOutput(*ApplyClosedFormErasure().apply(model, clip, concepts, anchor, preserve, lamb,
                                                             token_policy))


NODES = [LoadErasureAdapterV3, ErasureGateV3, ApplyClosedFormErasureV3]


def schema_problems() -> list[str]:
    """Why this ComfyUI would refuse our V3 nodes, by its own checks: `GET_SCHEMA` is what `load_custom_node` calls
    on each node (class check, `Schema.finalize`, `Schema.validate`); empty when it accepts them all."""
    problems = []
    for node in NODES:
        try:
            node.GET_SCHEMA()
        except Exception as error:  # whatever this ComfyUI's checks raise
            problems.append(f"{node.__name__}: {error}")
    return problems


class ErasureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ErasureExtension:
    return ErasureExtension()
