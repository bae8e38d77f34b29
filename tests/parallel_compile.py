"""What ``lateral_launch.compile_configs_in_parallel`` leaves in the JIT's cache, for sm_90 without a GPU
(a stand-in driver gives the target, device 0 and a null stream; nothing is launched): the forward
kernel autotuned over its first sm_90 fp16 configs, for a small channels_last launch with bias and top.

    python tests/parallel_compile.py [threads [configs]]    # prints JSON (see ``main``)

With configs = 10 (the whole list) and an empty TRITON_CACHE_DIR it times the two ways to compile
them: "seconds" with threads >= 2, "autotuner_seconds" (one after another) with threads = 1.

Run without TRITON_INTERPRET (the JIT must compile); tests/test_triton_aot.py runs it in a
subprocess, with TRITON_CACHE_DIR set to an empty folder (so every config really compiles)."""
import json
import os
import sys
import threading
import time

import torch
import triton
from triton.compiler.errors import CompilationError

from fused_fpn.kernels import lateral_kernels as K
from fused_fpn.kernels import lateral_launch as L
from written_arguments import _Sm90Driver   # this script's folder is on sys.path

CONFIGS = 3   # the default: the first three of the list


def _launch(configs: int):
    """(autotuner, grid, args, meta) of the forward for x [2, 64, 8, 12] fp16 channels_last, W [32, 64],
    bias, top [2, 32, 4, 6], as ``gemm_epilogue`` launches it on an sm_90 GPU with 132 SMs."""
    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 12, dtype=torch.float16).contiguous(**cl)
    w, b = torch.randn(32, 64, dtype=torch.float16), torch.randn(32, dtype=torch.float16)
    top = torch.randn(2, 32, 4, 6, dtype=torch.float16).contiguous(**cl)
    out = torch.empty(2, 32, 8, 12, dtype=torch.float16).contiguous(**cl)
    plan = L._fwd_plan(x, w, b, top, out, 132)
    tuner = triton.autotune(configs=K.fwd_configs("sm90", plan.kind)[:configs], key=K.FWD_AUTOTUNE_KEY)(K._lateral_fwd_kernel)
    return tuner, plan.grid, (x, w, b, top, out) + plan.scalars, plan.meta


_TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def _config_of(src, options) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a compile: what tells the configs apart."""
    tile = tuple(src.constants[(src.fn.arg_names.index(name),)] for name in _TILE)
    return tile + (options["num_warps"], options["num_stages"])


def _config_id(config) -> tuple:
    """The same five of an autotune config."""
    return tuple(config.kwargs[name] for name in _TILE) + (config.num_warps, config.num_stages)


def main() -> int:
    """Prints {"parallel": whether it compiled in parallel, "compiled": one entry per config (its
    num_warps, num_stages, whether the cached kernel is a finished CompiledKernel with a cubin),
    "threads": the names of the threads that compiled, "overlap": the most compiles running at once,
    "seconds": its wall time, "recompiled": compiles that a sequential ``Autotuner.warmup`` of the same
    launch made afterwards (the autotuner's benchmarks specialize the same way), "autotuner_seconds":
    that warmup's wall time, "finished_with_one_failing":
    the CompiledKernels in the cache after a parallel compile in which the second config's compile
    raised, "failed": per config, what a launch of it then gets ("compiled" or "raises <error>")}."""
    if L.interpreting():   # the package's (and triton's) reading of TRITON_INTERPRET
        print("unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    threads = sys.argv[1] if len(sys.argv) > 1 else "2"
    os.environ[L.COMPILE_THREADS_ENV] = threads
    triton.runtime.driver.set_active(_Sm90Driver())
    tuner, grid, args, meta = _launch(int(sys.argv[2]) if len(sys.argv) > 2 else CONFIGS)
    cache = tuner.fn.device_caches[0][0]   # creates the binder, which sets fn.compile
    compile_fn, lock = tuner.fn.compile, threading.Lock()
    running, record = [0], {"threads": set(), "overlap": 0, "compiles": 0, "fail": None}

    def compile_spy(src, *a, **kw):
        with lock:
            running[0] += 1
            record["compiles"] += 1
            record["overlap"] = max(record["overlap"], running[0])
            record["threads"].add(threading.current_thread().name.rsplit("_", 1)[0])
        try:
            if record["fail"] is not None and _config_of(src, kw["options"]) == record["fail"]:
                raise CompilationError("spy", None, "this config's compile fails")
            return compile_fn(src, *a, **kw)
        finally:
            with lock:
                running[0] -= 1

    tuner.fn.compile = compile_spy
    start = time.perf_counter()
    parallel = L.compile_configs_in_parallel(tuner, grid, args, meta)
    seconds = time.perf_counter() - start
    threads_seen, overlap = sorted(record["threads"]), record["overlap"]
    compiled = [dict(num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                     finished=type(k).__name__ == "CompiledKernel" and len(k.asm.get("cubin", b"")) > 0)
                for k in cache.values()]
    before, kernels = record["compiles"], dict(cache)
    start = time.perf_counter()
    tuner.warmup(*args, grid=grid, **meta)
    autotuner_seconds = time.perf_counter() - start
    recompiled = record["compiles"] - before + sum(cache[key] is not kernel for key, kernel in kernels.items())

    # a config whose compile fails: nothing raised here; where the autotuner launches it, the JIT
    # re-raises the error (triton 3.8 keeps the failed future, 3.6 keeps nothing and compiles again)
    cache.clear()
    record["fail"] = _config_id(tuner.configs[1])
    L.compile_configs_in_parallel(tuner, grid, args, meta)
    finished = sum(type(k).__name__ == "CompiledKernel" for k in cache.values())
    failed = []
    for config in tuner.configs:
        try:
            kernel = tuner.fn.warmup(*args, grid=grid, **meta, **config.all_kwargs())
            kernel.result() if hasattr(kernel, "result") else None   # what JITFunction.run does at a launch
            failed.append("compiled")
        except CompilationError as error:
            failed.append(f"raises {type(error).__name__}")
    print(json.dumps(dict(parallel=parallel, compiled=compiled, threads=threads_seen,
                          overlap=overlap, seconds=round(seconds, 2), recompiled=recompiled,
                          autotuner_seconds=round(autotuner_seconds, 2),
                          finished_with_one_failing=finished, failed=failed,
                          configs=[dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in tuner.configs])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
