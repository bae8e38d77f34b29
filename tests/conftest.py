"""Shared test set-up.

* TRITON_INTERPRET=1 is set here, before anything imports triton, only when no GPU is present:
  Triton kernels then run on CPU tensors through the interpreter.
* Every test runs with NaN-poisoned allocations (``nan_poison``, autouse): with deterministic
  algorithms on and ``fill_uninitialized_memory``, ATen fills every new float tensor (our
  kernels' outputs included) with NaN, so an element a kernel forgets to write fails the test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def nan_poison():
    from fpn_testing import nan_poisoned
    with nan_poisoned():
        yield


@pytest.fixture
def no_tf32():
    """fp32 GPU kernels follow allow_tf32 (TF32 by default for cuDNN): compare in IEEE fp32."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def cuda_emu(tmp_path_factory):
    """The CPU emulation of the CUDA kernels and their host code (tests/cuda_emu_testing.py)."""
    from cuda_emu_testing import build_cuda_emu, cuda_build_skip_reason
    reason = cuda_build_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return build_cuda_emu(str(tmp_path_factory.mktemp("cuda_emu")))
