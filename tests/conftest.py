"""Test configuration shared by the whole suite.

The Triton interpreter must be chosen before anything imports triton (torch._dynamo and
transformers do), so it is set here, at conftest import time, on machines without CUDA.
"""
from __future__ import annotations

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the imports below
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these)")
    skip_sweep = pytest.mark.skip(reason="the exhaustive compile sweep runs only when selected: pytest -m compile_sweep")
    sweep_selected = "compile_sweep" in (config.getoption("markexpr", "") or "")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "compile_sweep" in item.keywords and not sweep_selected:
            item.add_marker(skip_sweep)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
