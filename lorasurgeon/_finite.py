"""One finiteness check for tensors of any size, without whole-tensor temporaries."""

from __future__ import annotations

import math
from typing import Any

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (True for non-floating tensors).

    Fast path: a NaN or ±Inf entry makes the sum NaN or ±Inf, so a finite sum proves every entry
    finite; one reduction, no temporaries (measured 40x less CPU than ``isfinite().all()`` on
    256x8192 fp32). The sum can
    overflow with finite entries: then check exactly, in blocks of about 4M elements, because
    ``torch.isfinite`` on a whole matrix allocates abs() and bool temporaries (measured +230 MB of
    peak RSS on one 4096x8192 fp32 matrix).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    step = 1 << 22
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or ±Inf float replaced by None, recursively: strict JSON has no
    NaN (Python's json writes a bare ``NaN`` token that JavaScript, Go and serde reject). A
    non-finite figure means "not measured" (a dry run) or "undefined", which JSON says as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def result_json_without_adapter(result: Any) -> dict[str, Any]:
    """A result dataclass as JSON without its ``adapter`` field (the tensors it produced, which
    ``asdict`` would otherwise copy whole)."""
    from dataclasses import asdict, replace

    d = asdict(replace(result, adapter=None))
    del d["adapter"]
    return json_safe(d)
