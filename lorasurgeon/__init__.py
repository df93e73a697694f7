"""lorasurgeon: low-rank surgery on model checkpoints.

The library API: each function is what one CLI command calls, and returns the result dataclass
the command renders (``.to_json()`` gives its ``--json`` form).
"""

from lorasurgeon._version import __version__
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
from lorasurgeon.factorize import densify_checkpoint, factorize_checkpoint, make_rule
from lorasurgeon.finetune import attach_lora, distill_student
from lorasurgeon.inspection import inspect_checkpoint
from lorasurgeon.io.adapters import Adapter, LoraTarget, read_adapter, write_adapter
from lorasurgeon.io.checkpoint import Checkpoint
from lorasurgeon.io.writer import write_safetensors
from lorasurgeon.merge import merge_adapters
from lorasurgeon.nn.layers import LowRankConv2d, LowRankLinear, load_factorized
from lorasurgeon.nn.models import load_model
from lorasurgeon.ops.ranks import RankRule
from lorasurgeon.resize import extract_adapter, resize_adapter
from lorasurgeon.train import TrainOptions

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
    "extract_adapter",
    "factorize_checkpoint",
    "inspect_checkpoint",
    "load_factorized",
    "load_model",
    "make_rule",
    "merge_adapters",
    "read_adapter",
    "resize_adapter",
    "write_adapter",
    "write_safetensors",
]
