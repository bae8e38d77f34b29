"""Which arguments torch.compile takes each Triton kernel launch to write: torch's own analysis of the
kernel's TTIR (``torch._higher_order_ops.triton_kernel_wrap``: ``identify_accessed_tensors`` in
torch 2.14, ``identify_mutated_tensors`` in 2.11), run on the launches the launchers make for a small
channels_last problem (forward, dx, dW, db + dtop, and the forward with a persistent config), for
sm_90 without a GPU (a stand-in driver gives the target). An input taken as written would be copied
by functionalization before every compiled call: a hidden copy.

    python tests/written_arguments.py    # prints JSON {launch: [written argument names]}

Run without TRITON_INTERPRET (the analysis compiles the kernels to TTIR); tests/test_triton_aot.py
runs it in a subprocess."""
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from fused_fpn.kernels import lateral_kernels as K
from fused_fpn.kernels import lateral_launch as L


class _Sm90Driver:
    """Just enough of a triton driver for TTIR generation (the target) and for the JIT to specialize
    and compile without launching (device 0, a null stream; tests/parallel_compile.py)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _writes(kernel, kwargs):
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    if hasattr(tkw, "identify_accessed_tensors"):
        accesses = tkw.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    triton.runtime.driver.set_active(_Sm90Driver())
    launches = []
    L.interpreting = lambda: False
    L._device_facts = lambda device: ("sm90", 132)
    L._launch = lambda kernel, grid, args, meta, binary=False: launches.append((kernel, args, meta))
    L._launch_autotuned = lambda tuner, grid, args, meta, key, binary=False: launches.append((tuner, args, meta))
    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 12, dtype=torch.float16).contiguous(**cl)
    w, b = torch.randn(32, 64, dtype=torch.float16), torch.randn(32, dtype=torch.float16)
    top = torch.randn(2, 32, 4, 6, dtype=torch.float16).contiguous(**cl)
    out = L.lateral_forward(x, w, b, top)
    L.lateral_backward(torch.randn_like(out), x, w, 4, 6, True, True, True, True)
    names = ["fwd", "dx", "dW", "db_dtop"]
    written = {}
    for name, (kernel, args, meta) in zip(names, launches):
        tuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if tuned else kernel
        configs = [kernel.configs[0]] if tuned else [None]
        if name == "fwd":
            configs.append(K.EXPERIMENTAL_FWD_CONFIGS[("sm90", "16bit")][0])
        for i, cfg in enumerate(configs):
            kwargs = dict(zip(fn.arg_names, args), **{k: v for k, v in meta.items() if k in fn.arg_names})
            if cfg is not None:
                kwargs.update(cfg.kwargs)
            label = name + ("", " persistent")[i]
            written[label] = _writes(fn, kwargs)
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
