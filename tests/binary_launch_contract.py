"""Whether ``lateral_launch._launch_binary`` launches a kept binary as triton's own JIT launches it. The
JIT compiles for sm_90 without a GPU (a stand-in driver: the target, device 0, a stream per device,
and a launcher that records each launch call instead of launching); the launchers' real launches of a small
fp16 problem (forward, dx, dW, db + dtop) run three times with FUSED_FPN_TRITON_EXPERIMENTAL=1: the
autotuner's launch, the fast path's first launch of each binary key (through ``JITFunction.run``, which
returns the binary), then the binary launches. Each launch call is the binary's launcher called with
(grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit hook, every
argument): the third pass's calls must be the second's (the inputs compared by identity, the new
outputs by dtype, shape and strides), and each made by the launcher of the binary the JIT launched.

    python tests/binary_launch_contract.py [channels_last|nchw]    # prints JSON (see ``main``)

Run without TRITON_INTERPRET (the JIT must compile); tests/test_triton_aot.py runs it in a subprocess."""
import json
import os
import sys

import torch
import triton

from fused_fpn.kernels import lateral_kernels as K
from fused_fpn.kernels import lateral_launch as L
from written_arguments import _Sm90Driver   # this script's folder is on sys.path

CALLS = []   # (launcher, call arguments), in launch order


class _RecordingLauncher:
    """A binary's launcher (``driver.active.launcher_cls``) that records its calls (while ``record``)."""
    record = True

    def __init__(self, src, metadata):
        self.name = src.fn.__name__

    def __call__(self, *call):
        if self.record:
            CALLS.append((self, call))


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), ("function", name), 0, 0, 1024   # module, function, regs, spills, max threads


class _LaunchingSm90Driver(_Sm90Driver):
    launcher_cls = _RecordingLauncher
    utils = _Utils()

    def get_current_stream(self, device=None):
        return 1000 + device   # a stream per device: a launch on another device's stream differs


def _comparable(call, inputs) -> tuple:
    """A launch call with each of ``inputs`` (the tensors every pass passes) as itself, each other
    tensor (a pass's new outputs) as (dtype, shape, strides), and the launch metadata (triton 3.8's
    LazyDict: built for every launch, its launch hooks being never None) as its contents."""
    def part(a):
        if any(a is t for t in inputs):
            return "input", id(a)
        if isinstance(a, torch.Tensor):
            return "tensor", a.dtype, tuple(a.shape), a.stride()
        if type(a).__name__ == "LazyDict":
            return "launch metadata", a.data, len(a.extras)
        return a
    return tuple(map(part, call))


def use_stand_in_driver() -> None:
    """The launchers as on an sm_90 GPU with 132 SMs (device 0, not capturing), triton's JIT compiling
    for sm_90 with the stand-in driver, each autotuner taking its list's first config, no compile
    threads. Also benchmarks/launch_overhead.py --stand-in-sm90's setup."""
    triton.runtime.driver.set_active(_LaunchingSm90Driver())
    os.environ[K.AUTOTUNE_ENV] = "0"           # each list's first config: no benchmarking
    os.environ[L.COMPILE_THREADS_ENV] = "1"
    L._device_facts = lambda device: ("sm90", 132)
    L._device_index = lambda: 0
    L._capturing = lambda: False


def main() -> int:
    """Prints {"launches": the launchers' names per pass, "jit_runs": JITFunction.run calls per pass,
    "same": whether the third pass's calls equal the second's, "same_launcher": whether each was made by the launcher of the binary the second pass
    launched, "first_pass_same": the same comparison against the autotuner's pass}."""
    if L.interpreting():
        print("unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    layout = sys.argv[1] if len(sys.argv) > 1 else "channels_last"
    use_stand_in_driver()
    os.environ[K.EXPERIMENTAL_ENV] = "1"       # the binary launches
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 12, generator=g, dtype=torch.float16).contiguous(memory_format=fmt)
    w, b = torch.randn(32, 64, generator=g, dtype=torch.float16), torch.randn(32, generator=g, dtype=torch.float16)
    top = torch.randn(2, 32, 4, 6, generator=g, dtype=torch.float16).contiguous(memory_format=fmt)
    grad = torch.randn(2, 32, 8, 12, generator=g, dtype=torch.float16).contiguous(memory_format=fmt)

    def step():
        L.lateral_forward(x, w, b, top)
        L.lateral_backward(grad, x, w, 4, 6, True, True, True, True)

    jit_run, jit_runs = triton.runtime.JITFunction.run, []

    def counted(self, *args, **kwargs):   # (warmup=True runs too, but none is made outside a capture)
        jit_runs[-1] += 1
        return jit_run(self, *args, **kwargs)

    triton.runtime.JITFunction.run = counted
    passes = []
    for _ in range(3):
        CALLS.clear()
        jit_runs.append(0)
        L.run_directly(step)
        passes.append(list(CALLS))
    jit, binary = passes[1], passes[2]
    inputs = (x, w, b, top, grad)
    same = lambda one, other: [_comparable(a, inputs) == _comparable(b, inputs)   # noqa: E731
                               for (_, a), (_, b) in zip(one, other)]
    print(json.dumps({
        "launches": [[launcher.name for launcher, _ in p] for p in passes],
        "jit_runs": jit_runs,
        "same": same(jit, binary),
        "same_launcher": [la is lb for (la, _), (lb, _) in zip(jit, binary)],
        "first_pass_same": same(passes[0], binary),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
