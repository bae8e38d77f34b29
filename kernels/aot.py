"""Ahead-of-time compilation of every Triton kernel config for a GPU target, without a GPU.

    python -m fused_fpn.kernels.aot --arch 90 --arch 80 [--json OUT]

compiles each config of each kernel with ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", arch, 32))`` and reports, per compile: kernel, arch, dtype, layout, config,
shared memory (bytes, from the compiled metadata), whether the PTX uses wgmma, how many async
global-to-shared copies the TTGIR has (``async_copies``: 0 means the software pipeliner left the
loads synchronous), registers and stack bytes per thread (``regs``, ``stack``: cuobjdump's resource
usage of the cubin; stack is spill space), the fp32 divisions in the PTX (``fp32_divisions``, e.g.
["div.rn.f32"]: an in-kernel nearest scale must be the IEEE division), or the error.
Run it in a process where TRITON_INTERPRET is NOT set (``@triton.jit`` then yields JITFunctions,
which the compiler needs); tests/test_triton_aot.py does that in a subprocess.

The argument values mimic what the launcher passes for ResNet-50-FPN's P2 level (batch 2,
200x304, 256 -> 256 channels, top 100x152) so the specialization matches a real launch: ints equal
to 1 become constexprs (triton's JIT specializes them), ints divisible by 16 and all pointers get
the ``tt.divisibility`` 16 hint. The ``*_symbolic`` jobs compile the kernels' SCALE_IN_KERNEL variant
(what a trace with symbolic sizes launches), without the hint on the arguments a trace cannot
prove multiples of 16; the ``*_symbolic_ones`` ones with every size 1 (a 1 x 1 top, a
one-pixel-wide map: those arrive as constexprs), the ``*_i64`` ones with int64 sizes and non-unit
strides (inductor's type for a symbolic integer it cannot bound below 2^31). The ASTSource
signature/attrs format changed across triton versions: 3.2 takes an ``AttrsDescriptor``; 3.3+ a dict
{(arg index,): [["tt.divisibility", 16]]}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import triton
import triton.backends.compiler as _bc
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import lateral_kernels as K

SHARED_LIMIT = {90: 232448, 80: 166912}
# cuobjdump ships in triton's wheel (triton/backends/nvidia/bin); it reads registers and stack per kernel
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes):
    """(registers, stack bytes) per thread of a compiled kernel, from ``cuobjdump --dump-resource-usage``
    (a stack frame in these kernels is register spill space), or (None, None) without cuobjdump."""
    if not os.path.exists(CUOBJDUMP):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
USE_INPUT_PRECISION = K.USE_INPUT_PRECISION


def _specialize(fn, args: Dict[str, object], constexprs: Dict[str, object], unhinted=()):
    """(signature, constexprs, divisible-by-16 arg indices) the way triton's JIT specializes.
    ``unhinted``: integer arguments that get no divisibility hint (symbolic sizes: inductor hints a
    symbolic size only when it is statically a multiple of 16)."""
    sig, const, div16 = {}, dict(constexprs), []
    unspecialized = {fn.arg_names[a] if isinstance(a, int) else a for a in getattr(fn, "do_not_specialize", ())}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if name in unspecialized:       # @triton.jit(do_not_specialize=...): a plain integer
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            continue
        if isinstance(v, str):          # pointer type
            sig[name] = v
            div16.append(i)
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                const[name] = 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0 and name not in unhinted:
                    div16.append(i)
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"unsupported AOT argument {name}={v!r}")
    return sig, const, div16


def _source(fn, args, constexprs, unhinted=()):
    sig, const, div16 = _specialize(fn, args, constexprs, unhinted)
    if hasattr(_bc, "AttrsDescriptor"):  # triton 3.2
        attrs = _bc.AttrsDescriptor.from_dict({
            "arg_properties": {"tt.divisibility": div16,
                               "tt.equal_to": [fn.arg_names.index(k) for k, v in const.items()
                                               if sig.get(k) == "constexpr" and k not in constexprs]},
            "cls": "AttrsDescriptor"})
        return ASTSource(fn, sig, const, attrs)
    return ASTSource(fn, sig, const, {(i,): [["tt.divisibility", 16]] for i in div16})


def _strides(n, c, h, w, layout):
    if layout == "channels_last":
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def fwd_args(dtype: str, layout: str):
    n, cin, cout, h, w, ht, wt = 2, 256, 256, 200, 304, 100, 152
    p = _TY[dtype]
    xs, ts, os_ = _strides(n, cin, h, w, layout), _strides(n, cout, ht, wt, layout), _strides(n, cout, h, w, layout)
    args = dict(x_ptr=p, w_ptr=p, b_ptr=p, top_ptr=p, out_ptr=p,
                M=n * h * w, HW=h * w, W_=w, CIN=cin, COUT=cout, HT=ht, WT=wt,
                scale_h=0.5, scale_w=0.5,
                sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3], swn=cin, swk=1, sb=1,
                stn=ts[0], stc=ts[1], sth=ts[2], stw=ts[3],
                son=os_[0], soc=os_[1], soh=os_[2], sow=os_[3],
                TUNE_KEY=K.tune_key(n * h * w, xs[1] == 1, os_[1] == 1, True))
    return args


def dx_args(dtype: str, layout: str):
    """The forward kernel as the backward's dx = dy . W: W^T through swapped strides, no epilogue."""
    args = fwd_args(dtype, layout)
    args.update(swn=1, swk=256, sb=0, HT=1, WT=1, stn=0, stc=0, sth=0, stw=0,
                TUNE_KEY=K.tune_key(args["M"], args["sxc"] == 1, args["soc"] == 1, False))   # W^T: swk != 1
    return args


def grad_weight_args(dtype: str, layout: str):
    n, cin, cout, h, w = 2, 256, 256, 200, 304
    p = _TY[dtype]
    ds, xs = _strides(n, cout, h, w, layout), _strides(n, cin, h, w, layout)
    return dict(dy_ptr=p, x_ptr=p, part_ptr="*fp32", M=n * h * w, HW=h * w, W_=w, CIN=cin, COUT=cout,
                ROWS_PER_SPLIT=3840, sdn=ds[0], sdc=ds[1], sdh=ds[2], sdw=ds[3],
                sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3], TUNE_KEY=K.tune_key(n * h * w, ds[1] == 1, xs[1] == 1))


def grad_bias_top_args(dtype: str, layout: str):
    n, c, h, w, ht, wt = 2, 256, 200, 304, 100, 152
    p = _TY[dtype]
    ds, ts = _strides(n, c, h, w, layout), _strides(n, c, ht, wt, layout)
    return dict(dy_ptr=p, dtop_ptr=p, dbpart_ptr="*fp32", H=h, W_=w, HT=ht, WT=wt, C=c, N_TW_BLOCKS=5, ROWS=n * ht * 5,
                scale_h=0.5, scale_w=0.5, ITER_H=9, ITER_W=10,
                sdn=ds[0], sdc=ds[1], sdh=ds[2], sdw=ds[3], stn=ts[0], stc=ts[1], sth=ts[2], stw=ts[3])


STRIDED_VIEWS = {"X_FLAT": False, "O_FLAT": False}


def jobs(archs=(90, 80)) -> List[dict]:
    """Every (kernel, arch, dtype, layout, config) to compile: each config of each (arch, kind) list
    (the forward's experimental configs too, ``K.fwd_configs(..., experimental=True)``), in the
    dtypes / layouts / precisions that take it. Forward: fp16/bf16 channels_last and fp16 NCHW
    ("16bit"), fp32 with TF32 dot ("tf32") and with IEEE dot ("ieee"); the same kernel as the
    backward's dx ("fwd_dx": W^T, no epilogue) in fp16 and in both fp32 kinds; weight gradient in
    fp16/bf16 and both fp32 kinds; bias/top gradient (one fixed config) in every dtype. And each default
    forward config once more with x and out strided (``flags``: X_FLAT = O_FLAT = False) and, for fp32,
    in NCHW."""
    kinds = {"16bit": [("fp16", "channels_last"), ("bf16", "channels_last"), ("fp16", "nchw")],
             "tf32": [("fp32", "channels_last")], "ieee": [("fp32", "channels_last")]}
    out = []

    def add(kernel, arch, dtype, layout, kind, cfg, flags=None):
        out.append(dict(kernel=kernel, arch=arch, dtype=dtype, layout=layout, tf32=kind != "ieee",
                        meta=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        flags=dict(flags or {})))

    for arch in archs:
        a = f"sm{arch}"
        for kind, variants in kinds.items():
            for dtype, layout in variants:
                for cfg in K.fwd_configs(a, kind, experimental=True):
                    add("fwd", arch, dtype, layout, kind, cfg)
            dx_dtype, dx_layout = variants[0]
            for cfg in K.fwd_configs(a, kind, experimental=True):
                add("fwd_dx", arch, dx_dtype, dx_layout, kind, cfg)
            for dtype, layout in variants[:2]:
                for cfg in K.GRAD_WEIGHT_CONFIGS[(a, kind)]:
                    add("grad_weight", arch, dtype, layout, kind, cfg)
            # the forward's other index paths, default configs: x and out as views whose (h, w) do not
            # flatten (X_FLAT = O_FLAT = False: per-pixel h, w offsets), and fp32 NCHW
            for cfg in K.fwd_configs(a, kind):
                add("fwd", arch, variants[0][0], variants[0][1], kind, cfg, STRIDED_VIEWS)
                if kind != "16bit":
                    add("fwd", arch, "fp32", "nchw", kind, cfg)
            # the variant a trace with symbolic sizes launches (scales computed in the kernel): the
            # default configs, channels_last (and NCHW for fp16), and as dx
            for dtype, layout in variants[::2]:
                for cfg in K.fwd_configs(a, kind):
                    add("fwd_symbolic", arch, dtype, layout, kind, cfg)
            for cfg in K.fwd_configs(a, kind):
                add("fwd_dx_symbolic", arch, dx_dtype, dx_layout, kind, cfg)
        for dtype in ("fp16", "bf16", "fp32"):
            out.append(dict(kernel="grad_bias_top", arch=arch, dtype=dtype, layout="channels_last", tf32=False,
                            meta=dict(K.GRAD_BIAS_TOP_META), **K.GRAD_BIAS_TOP_LAUNCH))
        out.append(dict(kernel="grad_bias_top_symbolic", arch=arch, dtype="fp16", layout="channels_last", tf32=False,
                        meta=dict(K.GRAD_BIAS_TOP_META), **K.GRAD_BIAS_TOP_LAUNCH))
        # every size 1 (constexprs, triton's JIT specializes integers equal to 1), scales in the kernel;
        # and every size and stride an int64 (inductor passes a symbolic size whose range it cannot
        # bound below 2^31 as i64)
        add("fwd_symbolic_ones", arch, "fp16", "channels_last", "16bit", K.fwd_configs(a, "16bit")[0])
        out.append(dict(kernel="grad_bias_top_symbolic_ones", arch=arch, dtype="fp16", layout="channels_last",
                        tf32=False, meta=dict(K.GRAD_BIAS_TOP_META), **K.GRAD_BIAS_TOP_LAUNCH))
        for dtype, layout in (("fp16", "channels_last"), ("fp16", "nchw")):
            add("fwd_symbolic_i64", arch, dtype, layout, "16bit", K.fwd_configs(a, "16bit")[0])
        add("grad_weight_i64", arch, "fp16", "channels_last", "16bit", K.GRAD_WEIGHT_CONFIGS[(a, "16bit")][0])
        out.append(dict(kernel="grad_bias_top_symbolic_i64", arch=arch, dtype="fp16", layout="channels_last",
                        tf32=False, meta=dict(K.GRAD_BIAS_TOP_META), **K.GRAD_BIAS_TOP_LAUNCH))
    return out


# Size and stride arguments that a trace with symbolic sizes passes (the channel counts come from
# the weights: static; unit strides stay 1); the *_i64 jobs give them int64 values.
_SYMBOLIC_ARGS = {
    "fwd": ("M", "HW", "W_", "HT", "WT", "sxn", "sxc", "sxh", "sxw", "stn", "stc", "sth", "stw",
            "son", "soc", "soh", "sow"),
    "grad_weight": ("M", "HW", "W_", "ROWS_PER_SPLIT", "sdn", "sdc", "sdh", "sdw", "sxn", "sxc", "sxh", "sxw"),
    "grad_bias_top": ("H", "W_", "HT", "WT", "N_TW_BLOCKS", "ROWS", "sdn", "sdc", "sdh", "sdw",
                      "stn", "stc", "sth", "stw"),
}
# Of those, the ones that get no divisibility hint in a trace: inductor hints a symbolic integer only
# when it is statically a multiple of 16. The sizes; and in NCHW the channel and row strides (H * W,
# W), while the strides that carry a channel count of 256 (channels_last's, and the image stride)
# are multiples of 16 whatever the sizes. ROWS_PER_SPLIT is a multiple of 256.
_UNHINTED_SIZES = {"fwd": ("M", "HW", "W_", "HT", "WT"), "grad_weight": ("M", "HW", "W_"),
                   "grad_bias_top": ("H", "W_", "HT", "WT", "N_TW_BLOCKS", "ROWS")}
_UNHINTED_NCHW_STRIDES = {"fwd": ("sxc", "sxh", "stc", "sth", "soc", "soh"),
                          "grad_weight": ("sdc", "sdh", "sxc", "sxh"), "grad_bias_top": ("sdc", "sdh", "stc", "sth")}


def _as_int64(args: dict, names) -> None:
    for i, name in enumerate(names):
        if args[name] not in (0, 1):   # unit strides stay as they are
            args[name] = 2**31 + 16 * (i + 1)


def kind_of(job: dict) -> str:
    """The kind of the (arch, kind) config list a GEMM job's config comes from."""
    return K.operand_kind(2 if job["dtype"] in ("fp16", "bf16") else 4, job["tf32"])


def compile_job(job: dict) -> dict:
    kernel, dtype, layout = job["kernel"], job["dtype"], job["layout"]
    in_kernel = "_symbolic" in kernel
    if kernel.startswith("fwd"):
        epilogue = not kernel.startswith("fwd_dx")
        fn, args = K._lateral_fwd_kernel, (fwd_args if epilogue else dx_args)(dtype, layout)
        if kernel.endswith("_ones"):   # x, top, out [2, 256, 1, 1] channels_last: strides (256, 1, 256, 256)
            args.update(M=2, HW=1, W_=1, HT=1, WT=1, sxh=256, sxw=256, sth=256, stw=256, soh=256, sow=256)
        constexprs = dict(HAS_BIAS=epilogue, HAS_TOP=epilogue, X_FLAT=True, O_FLAT=True, ALLOW_TF32=job["tf32"],
                          USE_INPUT_PRECISION=USE_INPUT_PRECISION, SCALE_IN_KERNEL=in_kernel, **job["meta"])
        constexprs.update(job.get("flags", {}))
    elif kernel.startswith("grad_weight"):
        fn, args = K._lateral_grad_weight_kernel, grad_weight_args(dtype, layout)
        constexprs = dict(D_FLAT=True, X_FLAT=True, ALLOW_TF32=job["tf32"], USE_INPUT_PRECISION=USE_INPUT_PRECISION,
                          **job["meta"])
    else:
        fn, args = K._lateral_grad_bias_top_kernel, grad_bias_top_args(dtype, layout)
        if kernel.endswith("_ones"):   # dy, top [2, 256, 1, 1] channels_last
            args.update(H=1, W_=1, HT=1, WT=1, N_TW_BLOCKS=1, ROWS=2, sdh=256, sdw=256, sth=256, stw=256)
        constexprs = dict(HAS_TOP=True, SCALE_IN_KERNEL=in_kernel, **job["meta"])
    base = "fwd" if kernel.startswith("fwd") else "grad_weight" if kernel.startswith("grad_weight") else "grad_bias_top"
    unhinted = ()
    if in_kernel or kernel.endswith("_i64"):   # what a trace with symbolic sizes compiles
        unhinted = _UNHINTED_SIZES[base] + (_UNHINTED_NCHW_STRIDES[base] if layout == "nchw" else ())
    if kernel.endswith("_i64"):
        _as_int64(args, _SYMBOLIC_ARGS[base])
    result = dict(job)
    t0 = time.time()
    try:
        compiled = triton.compile(_source(fn, args, constexprs, unhinted), target=GPUTarget("cuda", job["arch"], 32),
                                  options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
        meta = compiled.metadata
        shared = meta["shared"] if isinstance(meta, dict) else meta.shared
        ptx, ttgir = compiled.asm.get("ptx", ""), compiled.asm.get("ttgir", "")
        regs, stack = resource_usage(compiled.asm["cubin"]) if compiled.asm.get("cubin") else (None, None)
        result.update(ok=True, shared=int(shared), wgmma="wgmma" in ptx, mma="mma." in ptx,
                      fp32_divisions=sorted(set(re.findall(r"\bdiv\.[a-z.]*f32\b", ptx))),
                      async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
                      regs=regs, stack=stack, has_cubin=bool(compiled.asm.get("cubin")), error=None)
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        result.update(ok=False, shared=None, wgmma=False, mma=False, fp32_divisions=None, async_copies=0, regs=None,
                      stack=None,
                      has_cubin=False,
                      error=f"{type(exc).__name__}: {exc}"[:2000])
    result["seconds"] = round(time.time() - t0, 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", help="write the results here (default: stdout)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces @triton.jit kernels", file=sys.stderr)
        return 2
    results = [compile_job(j) for j in jobs(tuple(args.arch or (90, 80)))]
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
