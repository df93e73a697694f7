"""lorasurgeon: low-rank surgery on model checkpoints.

The library API: each function is what one CLI command calls, and returns the result dataclass
the command renders (``.to_json()`` gives its ``--json`` form).
"""

# Names are imported on first use (PEP 562), so that ``import lorasurgeon`` and the CLI's start-up
# stay light until a function is needed (the CLI installs its signal handling first).
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lorasurgeon._version import __version__

_EXPORTS = {
    "Adapter": "lorasurgeon.io.adapters",
    "CalibrationOptions": "lorasurgeon.calibrate",
    "Checkpoint": "lorasurgeon.io.checkpoint",
    "FormatError": "lorasurgeon.errors",
    "InputNotFoundError": "lorasurgeon.errors",
    "InvalidOptionError": "lorasurgeon.errors",
    "LoraTarget": "lorasurgeon.io.adapters",
    "LorasurgeonError": "lorasurgeon.errors",
    "LowRankConv2d": "lorasurgeon.nn.layers",
    "LowRankLinear": "lorasurgeon.nn.layers",
    "MatchError": "lorasurgeon.errors",
    "OutputExistsError": "lorasurgeon.errors",
    "RankRule": "lorasurgeon.ops.ranks",
    "TrainOptions": "lorasurgeon.train",
    "UnsafeFileError": "lorasurgeon.errors",
    "UnsupportedError": "lorasurgeon.errors",
    "VerificationError": "lorasurgeon.errors",
    "WriteError": "lorasurgeon.errors",
    "attach_lora": "lorasurgeon.finetune",
    "compose_adapters": "lorasurgeon.compose",
    "convert_adapter": "lorasurgeon.convert",
    "densify_checkpoint": "lorasurgeon.factorize",
    "distill_student": "lorasurgeon.finetune",
    "export_model": "lorasurgeon.export",
    "extract_adapter": "lorasurgeon.resize",
    "factorize_checkpoint": "lorasurgeon.factorize",
    "factorize_module": "lorasurgeon.factorize",
    "inspect_checkpoint": "lorasurgeon.inspection",
    "load_factorized": "lorasurgeon.nn.layers",
    "load_model": "lorasurgeon.nn.models",
    "make_rule": "lorasurgeon.factorize",
    "merge_adapters": "lorasurgeon.merge",
    "merge_state_dict": "lorasurgeon.merge",
    "read_adapter": "lorasurgeon.io.adapters",
    "resize_adapter": "lorasurgeon.resize",
    "write_adapter": "lorasurgeon.io.adapters",
    "write_safetensors": "lorasurgeon.io.writer",
}

__all__ = [
    "Adapter",
    "CalibrationOptions",
    "Checkpoint",
    "FormatError",
    "InputNotFoundError",
    "InvalidOptionError",
    "LoraTarget",
    "LorasurgeonError",
    "LowRankConv2d",
    "LowRankLinear",
    "MatchError",
    "OutputExistsError",
    "RankRule",
    "TrainOptions",
    "UnsafeFileError",
    "UnsupportedError",
    "VerificationError",
    "WriteError",
    "__version__",
    "attach_lora",
    "compose_adapters",
    "convert_adapter",
    "densify_checkpoint",
    "distill_student",
    "export_model",
    "extract_adapter",
    "factorize_checkpoint",
    "factorize_module",
    "inspect_checkpoint",
    "load_factorized",
    "load_model",
    "make_rule",
    "merge_adapters",
    "merge_state_dict",
    "read_adapter",
    "resize_adapter",
    "write_adapter",
    "write_safetensors",
]



def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorasurgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from lorasurgeon.calibrate import CalibrationOptions
    from lorasurgeon.compose import compose_adapters
    from lorasurgeon.convert import convert_adapter
    from lorasurgeon.errors import (
        FormatError,
        InputNotFoundError,
        InvalidOptionError,
        LorasurgeonError,
        MatchError,
        OutputExistsError,
        UnsafeFileError,
        UnsupportedError,
        VerificationError,
        WriteError,
    )
    from lorasurgeon.export import export_model
    from lorasurgeon.factorize import densify_checkpoint, factorize_checkpoint, factorize_module, make_rule
    from lorasurgeon.finetune import attach_lora, distill_student
    from lorasurgeon.inspection import inspect_checkpoint
    from lorasurgeon.io.adapters import Adapter, LoraTarget, read_adapter, write_adapter
    from lorasurgeon.io.checkpoint import Checkpoint
    from lorasurgeon.io.writer import write_safetensors
    from lorasurgeon.merge import merge_adapters, merge_state_dict
    from lorasurgeon.nn.layers import LowRankConv2d, LowRankLinear, load_factorized
    from lorasurgeon.nn.models import load_model
    from lorasurgeon.ops.ranks import RankRule
    from lorasurgeon.resize import extract_adapter, resize_adapter
    from lorasurgeon.train import TrainOptions
