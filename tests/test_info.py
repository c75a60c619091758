"""`python -m dylora_kernels info`: it runs, says what was built and which GPU code covers which card."""
import subprocess
import sys

import pytest
import torch

from dylora_kernels import info, ops


def test_info_reports_the_build_and_the_device():
    out = subprocess.run([sys.executable, "-m", "dylora_kernels", "info"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.startswith("dylora_kernels ") and f"torch {torch.__version__}" in out
    if ops._C is None:
        assert "C++ extension: MISSING" in out
    else:
        assert ("GPU build" if ops._C.CUDA_BUILD else "CPU build") in out
    if not torch.cuda.is_available():
        assert "GPU: none seen by torch" in out and "backends on CPU" in out
    else:
        assert "GPU: " in out and "backends on this GPU: " in out


@pytest.mark.parametrize("archs, capability, covered", [
    ("8.0;8.6;8.9;9.0a", (8, 6), True),
    ("8.0;8.6;8.9;9.0a", (9, 0), True),
    ("8.0;8.6;8.9;9.0a", (8, 7), True),    # sm_87 runs sm_86 code (same major, lower minor)
    ("8.0;8.6;8.9;9.0a", (10, 0), False),  # no sm_100 code and no PTX
    ("8.0;9.0+PTX", (10, 0), True),        # PTX is compiled for newer GPUs
    ("8.6", (8, 0), False),                # sm_86 code does not run on sm_80
    ("7.5 8.0", (8, 0), True),
])
def test_arch_coverage(archs, capability, covered):
    assert info._archs_cover(archs, *capability) is covered
