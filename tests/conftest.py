from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.layer.0.attention.query.weight": torch.randn(16, 12, generator=g),
        "encoder.layer.0.attention.query.bias": torch.randn(16, generator=g),
        "encoder.layer.1.ffn.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(torch.float16),
        "embeddings.position_ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
