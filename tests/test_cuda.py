"""What only a GPU can show (skipped without one): the checks of benchmarks/gpu_checks.py, which
benchmarks/gpu_check.sh runs without pytest on a lent GPU."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_checks  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("check", gpu_checks.CHECKS, ids=lambda check: check.__name__)
def test_cuda(check):
    check()
