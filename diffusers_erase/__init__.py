"""diffusers-erase: concept erasure for Hugging Face diffusers pipelines.

    import diffusers_erase as de
    de.enable_erasure(pipe)
    pipe.erase_concept("Van Gogh", method="uce", anchor="art", preserve=["Monet"])
    pipe.save_erasure_adapter("erase-van-gogh/")
    pipe.unload_erasure()
    pipe.load_erasure_adapter("erase-van-gogh/")

    pipe.erase_concept("Snoopy", method="spm")      # a membrane: trained, gated per prompt
    pipe.set_erasure_adapters(["default"], weights=[0.8])

Every pipeline method is also a plain function taking the pipeline first.
"""

from . import attacks, detectors
from ._version import __version__
from .api import (
    erase_concept,
    erasure_gates,
    export_adapter,
    export_peft,
    export_text_encoder,
    fuse_erasure,
    get_erasures,
    load_erasure_adapter,
    save_erasure_adapter,
    set_erasure_adapters,
    unload_erasure,
)
from .config import ErasureConfig
from .deltas import Dense, LowRank, TextMap
from .evaluation import Evaluation, evaluate
from .hub import (
    card,
    model_card,
    push_erased_pipeline_to_hub,
    push_erasure_to_hub,
    save_erased_pipeline,
    save_erasure_folder,
)
from .kinds import Erasure, Guard, Membrane, WeightEdit, register_guard
from .methods.advunlearn import AdvUnlearnConfig
from .methods.esd import ESDConfig
from .methods.fewshot import FewShotConfig
from .methods.mace import MACEConfig
from .methods.rece import RECEConfig
from .methods.safree import SAFREEConfig
from .methods.sld import SLDConfig
from .methods.speed import SPEEDConfig
from .methods.spm import SPMConfig
from .methods.uce import UCEConfig
from .mixin import ErasureMixin, enable_erasure
from .registry import available_methods, register_method
from .text import TOKEN_POLICIES

__all__ = [
    "AdvUnlearnConfig",
    "Dense",
    "Erasure",
    "ErasureConfig",
    "Evaluation",
    "ErasureMixin",
    "Guard",
    "LowRank",
    "Membrane",
    "ESDConfig",
    "FewShotConfig",
    "MACEConfig",
    "RECEConfig",
    "SAFREEConfig",
    "SLDConfig",
    "SPEEDConfig",
    "SPMConfig",
    "TOKEN_POLICIES",
    "TextMap",
    "UCEConfig",
    "WeightEdit",
    "__version__",
    "attacks",
    "detectors",
    "evaluate",
    "available_methods",
    "card",
    "enable_erasure",
    "erase_concept",
    "erasure_gates",
    "export_adapter",
    "export_peft",
    "export_text_encoder",
    "fuse_erasure",
    "get_erasures",
    "load_erasure_adapter",
    "model_card",
    "push_erased_pipeline_to_hub",
    "push_erasure_to_hub",
    "register_guard",
    "register_method",
    "save_erased_pipeline",
    "save_erasure_adapter",
    "save_erasure_folder",
    "set_erasure_adapters",
    "unload_erasure",
]
