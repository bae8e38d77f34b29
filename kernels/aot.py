"""Ahead-of-time compilation of every Triton kernel config for a GPU target, without a GPU.

    python -m fused_fpn.kernels.aot --arch 90 --arch 80 [--json OUT]

compiles each config of each kernel with ``triton.compile(ASTSource(fn, signature, constexprs),
target=GPUTarget("cuda", arch, 32))`` and reports, per compile: kernel, arch, dtype, layout, config,
sizes, trace, whether the config comes from a NARROW_* list (``narrow``), the PIX_ALIGN it was
compiled with (``pix_align``; None for the bias / top gradient), shared memory (bytes, from the
compiled metadata), whether the PTX uses wgmma, how many async global-to-shared copies the TTGIR has
(``async_copies``: 0 means the software pipeliner left the loads synchronous), how many of the PTX's
copies are the copy engine's (``tma_copies``: cp.async.bulk.tensor, the TMA configs' x and W tiles),
the tensors it keeps in shared memory for its whole loop (``kept_in_shared``: the weight-stationary
forward's weight tile), registers and stack bytes per thread (``regs``, ``stack``: cuobjdump's
resource usage of the cubin; stack is spill space), the fp32 divisions in the PTX (``fp32_divisions``, e.g.
["div.rn.f32"]: an in-kernel nearest scale must be the IEEE division), or the error.
Run it in a process where TRITON_INTERPRET is NOT set (``@triton.jit`` then yields JITFunctions,
which the compiler needs); tests/test_triton_aot.py does that in a subprocess.

The argument values mimic what the launcher passes for ResNet-50-FPN's levels at 800 x 1216
(batch 2; ``LEVELS``: P2 200 x 304 with 256 input channels, most jobs; P4 50 x 76 with 1024 and P5
25 x 38 with 2048, whose H * W is not a multiple of 16; P5sq 25 x 25, an 800 x 800 image's, whose H * W
is odd), 256 output channels and a top of half the
size, so the specialization matches a real launch: ints equal to 1 become constexprs (triton's JIT
specializes them), ints divisible by 16 and all pointers get the ``tt.divisibility`` 16 hint, and
PIX_ALIGN is the launcher's (``lateral_kernels.pixel_alignment``). Each job names its kernel
(``fwd``, ``fwd_dx``: the forward kernel as the backward's dx, ``grad_weight``, ``grad_bias_top``),
its ``sizes`` (a level of ``LEVELS``, or "ones": every size 1, a 1 x 1 top and one-pixel-wide maps,
which arrive as constexprs) and its ``trace``: "eager" (concrete sizes, host scales), "symbolic"
(what a trace with symbolic sizes compiles: the kernels' SCALE_IN_KERNEL variant, no divisibility
hint on what a trace cannot prove a multiple of 16, PIX_ALIGN 1) or "symbolic_i64" (the same with
int64 sizes and non-unit strides: inductor's type for a symbolic integer it cannot bound below
2^31). The ASTSource signature/attrs format changed across triton versions: 3.2 takes an
``AttrsDescriptor``; 3.3+ a dict {(arg index,): [["tt.divisibility", 16]]}.
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
from .lateral_launch import interpreting

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
_TY_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
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


# (N, Cin, H, W): ResNet-50-FPN's level sizes at 800 x 1216, batch 2 (every job has Cout = 256 and,
# but at P5, the coarsest level, a top of half the size for the forward's epilogue)
# "P5sq": P5 of an 800 x 800 image, whose H * W = 625 is odd (the forward loads NCHW pixels one at a time)
LEVELS = {"P2": (2, 256, 200, 304), "P4": (2, 1024, 50, 76), "P5": (2, 2048, 25, 38), "P5sq": (2, 2048, 25, 25),
          "ones": (2, 256, 1, 1)}
NO_TOP = ("P5", "P5sq")
COUT = 256


def _top_size(h, w):
    return max(h // 2, 1), max(w // 2, 1)


def fwd_args(dtype: str, layout: str, sizes: str = "P2"):
    n, cin, h, w = LEVELS[sizes]
    cout, (ht, wt) = COUT, _top_size(h, w)
    p = _TY[dtype]
    xs, ts, os_ = _strides(n, cin, h, w, layout), _strides(n, cout, ht, wt, layout), _strides(n, cout, h, w, layout)
    if sizes in NO_TOP:   # as the launcher passes no top: 1 x 1, strides 0 (HAS_TOP off)
        ht, wt, ts = 1, 1, (0, 0, 0, 0)
    args = dict(x_ptr=p, w_ptr=p, b_ptr=p, top_ptr=p, out_ptr=p,
                M=n * h * w, HW=h * w, W_=w, CIN=cin, COUT=cout, HT=ht, WT=wt,
                scale_h=0.5, scale_w=0.5,
                sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3], swn=cin, swk=1, sb=1,
                stn=ts[0], stc=ts[1], sth=ts[2], stw=ts[3],
                son=os_[0], soc=os_[1], soh=os_[2], sow=os_[3],
                TUNE_KEY=K.tune_key(n * h * w, xs[1] == 1, os_[1] == 1, True))
    return args


def dx_args(dtype: str, layout: str, sizes: str = "P2"):
    """The forward kernel as the backward's dx = dy . W: dy [N, Cout, H, W] in, dx [N, Cin, H, W]
    out, W^T through swapped strides, no epilogue."""
    n, cin, h, w = LEVELS[sizes]
    args = fwd_args(dtype, layout, sizes)
    dys, dxs = _strides(n, COUT, h, w, layout), _strides(n, cin, h, w, layout)
    args.update(CIN=COUT, COUT=cin, swn=1, swk=cin, sb=0, HT=1, WT=1, stn=0, stc=0, sth=0, stw=0,
                sxn=dys[0], sxc=dys[1], sxh=dys[2], sxw=dys[3], son=dxs[0], soc=dxs[1], soh=dxs[2], sow=dxs[3],
                TUNE_KEY=K.tune_key(args["M"], dys[1] == 1, dxs[1] == 1, False))   # W^T: swk != 1
    return args


def grad_weight_args(dtype: str, layout: str, sizes: str = "P2"):
    n, cin, h, w = LEVELS[sizes]
    cout, p = COUT, _TY[dtype]
    ds, xs = _strides(n, cout, h, w, layout), _strides(n, cin, h, w, layout)
    return dict(dy_ptr=p, x_ptr=p, part_ptr="*fp32", M=n * h * w, HW=h * w, W_=w, CIN=cin, COUT=cout,
                ROWS_PER_SPLIT=3840, sdn=ds[0], sdc=ds[1], sdh=ds[2], sdw=ds[3],
                sxn=xs[0], sxc=xs[1], sxh=xs[2], sxw=xs[3], TUNE_KEY=K.tune_key(n * h * w, ds[1] == 1, xs[1] == 1))


def grad_bias_top_args(dtype: str, layout: str, sizes: str = "P2"):
    n, _, h, w = LEVELS[sizes]
    c, (ht, wt) = COUT, _top_size(h, w)
    n_tw = -(-wt // K.GRAD_BIAS_TOP_META["BLOCK_TW"])
    p = _TY[dtype]
    ds, ts = _strides(n, c, h, w, layout), _strides(n, c, ht, wt, layout)
    return dict(dy_ptr=p, dtop_ptr=p, dbpart_ptr="*fp32", H=h, W_=w, HT=ht, WT=wt, C=c, N_TW_BLOCKS=n_tw,
                ROWS=n * ht * n_tw, scale_h=0.5, scale_w=0.5, ITER_H=h.bit_length() + 1, ITER_W=w.bit_length() + 1,
                sdn=ds[0], sdc=ds[1], sdh=ds[2], sdw=ds[3], stn=ts[0], stc=ts[1], sth=ts[2], stw=ts[3])


# the launcher's PIX_ALIGN operands (``lateral_launch.fwd_launch_args``, ``grad_weight``)
_PIX_ALIGN_ARGS = {"fwd": ("HW", "sxn", "sxc", "son", "soc"), "grad_weight": ("HW", "sdn", "sdc", "sxn", "sxc")}


def pix_align(base: str, dtype: str, args: dict) -> int:
    """The PIX_ALIGN the launcher passes with concrete sizes ``args`` (``base``: "fwd" or "grad_weight")."""
    return K.pixel_alignment(_TY_SIZE[dtype], *(args[a] for a in _PIX_ALIGN_ARGS[base]),
                             whole_vectors=base == "grad_weight")


# the (H * W, batch, channel, w stride) of each operand a kernel loads by pixels: x (dy for dx); dy and x
_LOADED = {"fwd": (("HW", "sxn", "sxc", "sxw"),),
           "grad_weight": (("HW", "sdn", "sdc", "sdw"), ("HW", "sxn", "sxc", "sxw"))}


def narrow(base: str, dtype: str, args: dict, flat: bool = True, unhinted=(), align=None) -> bool:
    """Whether the launcher takes the NARROW_* config lists for sizes ``args``
    (``lateral_launch.narrow_pixel_loads``: pixels loaded one element at a time): ``flat`` False for
    views whose (h, w) do not flatten, ``unhinted`` the arguments a trace cannot prove multiples of
    anything, ``align`` the PIX_ALIGN of the launch (default: the launcher's for concrete sizes)."""
    align = pix_align(base, dtype, args) if align is None else align
    value = lambda name: 17 if name in unhinted else args[name]   # noqa: E731  (17: no multiple of 2 or 16)
    return any(K.narrow_pixel_loads(align, *(value(a) for a in names), flat=flat) for names in _LOADED[base])


def tma(dtype: str, args: dict) -> bool:
    """Whether the launcher offers the TMA configs (``K.tma_loads``; with
    FUSED_FPN_TRITON_EXPERIMENTAL=1 on sm_90, eager calls only) to a forward launch of arguments
    ``args``, whose tensors' bases are aligned (as the launcher's fresh tensors are)."""
    hw, w = args["HW"], args["W_"]
    return K.tma_loads(_TY_SIZE[dtype], args["M"] // hw, hw // w, w, args["sxn"], args["sxc"], args["sxh"], args["sxw"],
                       args["CIN"], args["COUT"], args["swn"], args["swk"], aligned_bases=True)


STRIDED_VIEWS = {"X_FLAT": False, "O_FLAT": False}
KIND_DTYPES = (("16bit", "fp16"), ("tf32", "fp32"), ("ieee", "fp32"))   # a dtype of each kind of config list


def jobs(archs=(90, 80)) -> List[dict]:
    """Every (kernel, arch, dtype, layout, config, sizes, trace) to compile: each config of each
    (arch, kind) list (the forward's experimental configs too, ``K.fwd_configs(..., experimental=True)``;
    its TMA configs on channels_last x only, where the launcher offers them: ``tma``; its
    weight-stationary ones, ``K.RESIDENT_FWD_CONFIGS``, on channels_last x and dy only), in the dtypes /
    layouts / precisions that take it. At P2's sizes: the forward in fp16/bf16
    channels_last and fp16 NCHW ("16bit"), fp32 with TF32 dot ("tf32") and with IEEE dot ("ieee");
    the same kernel as the backward's dx (``fwd_dx``: W^T, no epilogue) in fp16 and in both fp32
    kinds; the weight gradient in fp16/bf16 and both fp32 kinds; the bias / top gradient (one fixed
    config) in every dtype; each default forward config once more with x and out strided (``flags``:
    X_FLAT = O_FLAT = False) and, for fp32, in NCHW. fp16 NCHW at P4 and P5: the forward and dx
    (PIX_ALIGN 8 and 2; P5's forward without a top, as the FPN runs it) and the weight gradient at
    P2 and P4 (PIX_ALIGN 1: hinted, and 8), default configs. The NARROW_* lists (``narrow``: field
    ``narrow`` of a job) where the launcher takes them: the weight gradient at P5 (no 16-byte
    vectors) in every kind, the forward at P5 of an 800 x 800 image (H * W = 625) in every kind, also
    as a strided view, and dx there in fp16, and in the traces with symbolic sizes,
    ``_add_symbolic_jobs``."""
    kinds = {"16bit": [("fp16", "channels_last"), ("bf16", "channels_last"), ("fp16", "nchw")],
             "tf32": [("fp32", "channels_last")], "ieee": [("fp32", "channels_last")]}
    out = []

    def add(kernel, arch, dtype, layout, kind, cfg, flags=None, sizes="P2", trace="eager", narrow=False, **extra):
        meta = dict(cfg.kwargs) if cfg is not None else dict(K.GRAD_BIAS_TOP_META)
        launch = (dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg is not None
                  else dict(K.GRAD_BIAS_TOP_LAUNCH))
        out.append(dict(kernel=kernel, arch=arch, dtype=dtype, layout=layout, tf32=kind != "ieee",
                        meta=meta, flags=dict(flags or {}), sizes=sizes, trace=trace, narrow=narrow,
                        **launch, **extra))

    for arch in archs:
        a = f"sm{arch}"
        for kind, variants in kinds.items():
            # the TMA and weight-stationary configs where the launcher offers them: channels_last x
            # (every BLOCK_K of the weight-stationary list, at P2's Cin 256: the compile does not read it)
            def resident(layout):
                return K.RESIDENT_FWD_CONFIGS.get((a, kind), []) if layout == "channels_last" else []
            for dtype, layout in variants:
                for cfg in K.fwd_configs(a, kind, experimental=True, tma=layout == "channels_last") + resident(layout):
                    add("fwd", arch, dtype, layout, kind, cfg)
            dx_dtype, dx_layout = variants[0]
            for cfg in K.fwd_configs(a, kind, experimental=True) + resident(dx_layout):
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
        for dtype in ("fp16", "bf16", "fp32"):
            add("grad_bias_top", arch, dtype, "channels_last", "ieee", None)   # (no dot: tf32 False)
        # NCHW whose H * W is not a multiple of 16 (JIT hints none; PIX_ALIGN tells the kernels)
        for sizes in ("P4", "P5"):
            for kernel in ("fwd", "fwd_dx"):
                for cfg in K.fwd_configs(a, "16bit"):
                    add(kernel, arch, "fp16", "nchw", "16bit", cfg, sizes=sizes)
        for sizes in ("P2", "P4"):
            for cfg in K.GRAD_WEIGHT_CONFIGS[(a, "16bit")]:
                add("grad_weight", arch, "fp16", "nchw", "16bit", cfg, sizes=sizes)
        # NCHW pixels loaded one element at a time: the NARROW_* lists
        for kind, dtype in KIND_DTYPES:
            for cfg in K.grad_weight_configs(a, kind, narrow=True):
                add("grad_weight", arch, dtype, "nchw", kind, cfg, sizes="P5", narrow=True)
            for cfg in K.fwd_configs(a, kind, narrow=True):
                add("fwd", arch, dtype, "nchw", kind, cfg, sizes="P5sq", narrow=True)
                # views whose (h, w) do not flatten (X_FLAT = O_FLAT = False: per-pixel h, w offsets)
                add("fwd", arch, dtype, "nchw", kind, cfg, STRIDED_VIEWS, sizes="P5sq", narrow=True)
                if kind == "16bit":
                    add("fwd_dx", arch, dtype, "nchw", kind, cfg, sizes="P5sq", narrow=True)
        _add_symbolic_jobs(arch, add)
    return out


def _add_symbolic_jobs(arch: int, add) -> None:
    """What a trace with symbolic sizes compiles (trace "symbolic": the SCALE_IN_KERNEL variant, no
    divisibility hint on the sizes): the forward and dx, channels_last with the default lists and
    NCHW with the NARROW_* lists (the launcher's choice when no alignment is known), in every kind;
    the weight gradient in NCHW (narrow, fp16); the bias / top gradient; the same with every size 1
    (sizes "ones": constexprs, which the interpreter cannot show), and with int64 sizes and strides
    (trace "symbolic_i64"; the weight gradient too, which has no scales); and the forward at P4 with
    only H symbolic (W = 76 static: H * W = 76 * s0 is provably a multiple of 4, so the launcher
    passes PIX_ALIGN 4 with SCALE_IN_KERNEL, and the default lists)."""
    a = f"sm{arch}"
    for kind, dtype in KIND_DTYPES:
        for layout in ("channels_last", "nchw"):
            for kernel in ("fwd", "fwd_dx"):
                for cfg in K.fwd_configs(a, kind, narrow=layout == "nchw"):
                    add(kernel, arch, dtype, layout, kind, cfg, trace="symbolic", narrow=layout == "nchw")
    for cfg in K.grad_weight_configs(a, "16bit", narrow=True):
        add("grad_weight", arch, "fp16", "nchw", "16bit", cfg, trace="symbolic", narrow=True)
    add("grad_bias_top", arch, "fp16", "channels_last", "ieee", None, trace="symbolic")
    add("fwd", arch, "fp16", "channels_last", "16bit", K.fwd_configs(a, "16bit")[0], sizes="ones", trace="symbolic")
    add("grad_bias_top", arch, "fp16", "channels_last", "ieee", None, sizes="ones", trace="symbolic")
    for layout in ("channels_last", "nchw"):
        add("fwd", arch, "fp16", layout, "16bit", K.fwd_configs(a, "16bit", narrow=layout == "nchw")[0],
            trace="symbolic_i64", narrow=layout == "nchw")
    add("grad_weight", arch, "fp16", "channels_last", "16bit", K.GRAD_WEIGHT_CONFIGS[(a, "16bit")][0],
        trace="symbolic_i64")
    add("grad_bias_top", arch, "fp16", "channels_last", "ieee", None, trace="symbolic_i64")
    add("fwd", arch, "fp16", "nchw", "16bit", K.fwd_configs(a, "16bit")[0], sizes="P4", trace="symbolic",
        pix_align=4)


# Size and stride arguments that a trace with symbolic sizes passes (the channel counts come from
# the weights: static; unit strides stay 1); the "symbolic_i64" jobs give them int64 values.
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


def unhinted_args(job: dict):
    """The arguments of a job that its trace gives no divisibility hint (none in eager jobs)."""
    if job["trace"] == "eager":
        return ()
    base = _BASE[job["kernel"]]
    return _UNHINTED_SIZES[base] + (_UNHINTED_NCHW_STRIDES[base] if job["layout"] == "nchw" else ())


def kind_of(job: dict) -> str:
    """The kind of the (arch, kind) config list a GEMM job's config comes from."""
    return K.operand_kind(2 if job["dtype"] in ("fp16", "bf16") else 4, job["tf32"])


# a job's kernel -> its base: which kernel function, arguments and PIX_ALIGN rule it compiles
_BASE = {"fwd": "fwd", "fwd_dx": "fwd", "grad_weight": "grad_weight", "grad_bias_top": "grad_bias_top"}


def job_args(job: dict):
    """(kernel function, base: "fwd" / "grad_weight" / "grad_bias_top", the arguments' values) of a job,
    before a trace's changes (``compile_job``)."""
    kernel, dtype, layout, sizes = job["kernel"], job["dtype"], job["layout"], job["sizes"]
    base = _BASE[kernel]
    if base == "fwd":
        return K._lateral_fwd_kernel, base, (fwd_args if kernel == "fwd" else dx_args)(dtype, layout, sizes)
    if base == "grad_weight":
        return K._lateral_grad_weight_kernel, base, grad_weight_args(dtype, layout, sizes)
    return K._lateral_grad_bias_top_kernel, base, grad_bias_top_args(dtype, layout, sizes)


def kept_in_shared(ttgir: str) -> List[str]:
    """The tensors a kernel copies into shared memory before its first loop, e.g. ["256x256xf16"]: a
    ``ttg.local_alloc`` of a value there is kept for the whole loop (the weight-stationary forward's
    weight tile; the other kernels' loop operands go through the pipeliner's own buffers)."""
    body = ttgir[ttgir.find("tt.func public"):]
    loop = body.find("scf.for")
    return re.findall(r"ttg\.local_alloc %\S+ : \(tensor<([0-9x]+x[a-z0-9]+)", body[:loop if loop >= 0 else len(body)])


def compile_job(job: dict) -> dict:
    kernel, dtype, sizes = job["kernel"], job["dtype"], job["sizes"]
    traced = job["trace"] != "eager"   # symbolic sizes: scales in the kernel, no hints, PIX_ALIGN 1
    fn, base, args = job_args(job)
    if base == "fwd":
        epilogue = kernel == "fwd"
        constexprs = dict(HAS_BIAS=epilogue, HAS_TOP=epilogue and sizes not in NO_TOP, X_FLAT=True, O_FLAT=True,
                          ALLOW_TF32=job["tf32"],
                          USE_INPUT_PRECISION=USE_INPUT_PRECISION, SCALE_IN_KERNEL=traced, **job["meta"])
        constexprs.update(job["flags"])
    elif base == "grad_weight":
        constexprs = dict(D_FLAT=True, X_FLAT=True, ALLOW_TF32=job["tf32"], USE_INPUT_PRECISION=USE_INPUT_PRECISION,
                          **job["meta"])
    else:
        constexprs = dict(HAS_TOP=True, SCALE_IN_KERNEL=traced, **job["meta"])
        if traced:   # the launcher passes no search depths then
            args.update(ITER_H=0, ITER_W=0)
    if base in _PIX_ALIGN_ARGS:
        constexprs["PIX_ALIGN"] = job.get("pix_align") or (1 if traced else pix_align(base, dtype, args))
    unhinted = unhinted_args(job)
    if job["trace"] == "symbolic_i64":
        _as_int64(args, _SYMBOLIC_ARGS[base])
    result = dict(job, pix_align=constexprs.get("PIX_ALIGN"))
    t0 = time.time()
    try:
        compiled = triton.compile(_source(fn, args, constexprs, unhinted), target=GPUTarget("cuda", job["arch"], 32),
                                  options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
        meta = compiled.metadata
        shared = meta["shared"] if isinstance(meta, dict) else meta.shared
        ptx, ttgir = compiled.asm.get("ptx", ""), compiled.asm.get("ttgir", "")
        regs, stack = resource_usage(compiled.asm["cubin"]) if compiled.asm.get("cubin") else (None, None)
        result.update(ok=True, shared=int(shared), wgmma="wgmma" in ptx, mma="mma." in ptx,
                      kept_in_shared=kept_in_shared(ttgir),
                      fp32_divisions=sorted(set(re.findall(r"\bdiv\.[a-z.]*f32\b", ptx))),
                      async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
                      tma_copies=ptx.count("cp.async.bulk.tensor"),
                      regs=regs, stack=stack, has_cubin=bool(compiled.asm.get("cubin")), error=None)
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        result.update(ok=False, shared=None, wgmma=False, mma=False, kept_in_shared=None, fp32_divisions=None,
                      async_copies=0, tma_copies=0,
                      regs=None,
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
    if interpreting():   # the package's (and triton's) reading of TRITON_INTERPRET
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
