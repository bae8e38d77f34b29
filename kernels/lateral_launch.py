"""Launchers of the Triton lateral kernels: allocation, strides (in elements), grid and config.

``lateral_forward`` and ``lateral_backward`` are the bodies of the registered ops
``fused_fpn::triton_lateral`` and ``fused_fpn::triton_lateral_backward``
(``fused_fpn/backends/triton.py``). They never copy an input (strides go to the kernels), never
synchronize with the host and allocate only through torch (the caching allocator), so they are
CUDA-graph safe once the autotuner has picked its configs (the first call of a shape inside a
capture raises a RuntimeError instead of tuning there). On a GPU every launch asks
``torch.library.wrap_triton`` first (but inside ``run_directly``: an op body that a plain eager call
runs without the dispatcher): while torch.compile traces the op it returns a wrapper that
records the launch (so torch.compile sees the kernels); in eager it returns the kernel, and an
autotuned kernel whose key was tuned before is launched with the chosen config directly
(``_launch_autotuned``), and what a launch derives from its tensors' sizes, strides and dtypes is
computed once per such signature (``launch_plan``). With FUSED_FPN_TRITON_EXPERIMENTAL=1 an eager
launch made before runs the binary triton's JIT returned for it, without ``JITFunction.run``
(``_launch_binary``; not yet run on a GPU). Under TRITON_INTERPRET=1 (CPU tensors) the kernels run
directly with one small fixed config.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch

from fused_fpn._layout import output_memory_format
from fused_fpn._precision import conv_allows_tf32
from fused_fpn.reference import nearest_scale

from . import lateral_kernels as K
from .limits import MAX_GRAD_WEIGHT_SPLIT, MAX_PROGRAMS

USE_INPUT_PRECISION = K.USE_INPUT_PRECISION


# Read once, when the kernels are defined (lateral_kernels, imported above): triton makes @triton.jit
# functions interpreted or compiled then, so a later change of the variable cannot take effect.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when triton runs these kernels through its CPU interpreter (TRITON_INTERPRET=1 when they
    were defined)."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0 (ints or SymInts). Host code uses this, not ``triton.cdiv``:
    in triton 3.8 that is a ``constexpr_function``, whose call from Python costs microseconds."""
    return (a + b - 1) // b


# Tests set this to run the kernels' SCALE_IN_KERNEL variant on concrete sizes too (it is what a
# trace with symbolic sizes compiles; on a GPU nothing else runs it eagerly).
FORCE_SCALE_IN_KERNEL = False


def scale_in_kernel(*sizes) -> bool:
    """True when the kernels must compute the nearest scales (and the backward's search depths)
    themselves: a size is symbolic (torch.compile's dynamic shapes, torch.export with Dims traced
    the op), where float(size) or size.bit_length() on the host would pin it to its traced value
    (a recompile per image size, or an export error). Eager calls keep the host's scalars."""
    return FORCE_SCALE_IN_KERNEL or any(isinstance(s, torch.SymInt) for s in sizes)


def nearest_scale_args(in_h, out_h, in_w, out_w) -> Tuple[float, float, bool]:
    """(scale_h, scale_w, SCALE_IN_KERNEL) for a kernel launch: the host's scales, or placeholders
    (0.0) and True when the kernel computes them (``scale_in_kernel``)."""
    if scale_in_kernel(in_h, out_h, in_w, out_w):
        return 0.0, 0.0, True
    return nearest_scale(in_h, out_h), nearest_scale(in_w, out_w), False


def _divisibility(values):
    """The divisibility test of ``K.pixel_alignment`` and ``K.narrow_pixel_loads`` for these values:
    None (v % a == 0) for ints; with a symbolic value, a multiple only where the trace proves it
    without a guard (``statically_known_true``), so a trace with dynamic shapes gets no divisibility
    guard (as inductor's own kernels: no hint)."""
    if any(isinstance(v, torch.SymInt) for v in values):
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return lambda v, a: statically_known_true(v % a == 0)
    return None


def pixel_alignment(element_size: int, *values, whole_vectors: bool = False) -> int:
    """``K.pixel_alignment`` of sizes and strides that may be symbolic (``_divisibility``)."""
    return K.pixel_alignment(element_size, *values, multiple=_divisibility(values), whole_vectors=whole_vectors)


def narrow_pixel_loads(tensors, pix_align: int) -> bool:
    """True when the kernel loads one of ``tensors`` (x, or dy) one element at a time
    (``K.narrow_pixel_loads`` of its sizes and strides, which may be symbolic, and the launch's
    PIX_ALIGN): the launch then tunes over the NARROW_* config lists."""
    for t in tensors:
        if t.stride(1) == 1:   # K's first case (channels contiguous), taken here before the rest is read:
            continue           # every channels_last launch, on the eager hot path
        values = (t.shape[2] * t.shape[3], t.stride(0), t.stride(1), t.stride(3))
        if K.narrow_pixel_loads(pix_align, *values, flat=pixels_flatten(t), multiple=_divisibility(values)):
            return True
    return False


def _traced(t: torch.Tensor) -> bool:
    """True for the fake (or functional-wrapped fake) tensors a trace runs the op with; a plain tensor
    is answered without the check (~5 us a call), a Parameter or another subclass with it."""
    if type(t) is torch.Tensor:
        return False
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def tma_loads(inp: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the forward's x and W tiles can come through TMA descriptors: an eager call whose
    sizes and strides pass ``K.tma_loads`` and whose bases are 16-byte aligned. Never while a trace
    runs the op (fake tensors): the trace's autotuner would later run on whatever tensors the
    compiled code gets, whose alignment it cannot know (inductor copies a misaligned graph input,
    but other backends and replays of the graph do not)."""
    return tma_geometry(inp, weight) and aligned_bases(inp, weight)


def tma_geometry(inp: torch.Tensor, weight: torch.Tensor) -> bool:
    """``tma_loads`` but for the base addresses: what a launch plan keeps (no data pointers)."""
    if _traced(inp) or _traced(weight):
        return False
    if inp.stride(1) != 1 or weight.stride(1) != 1:   # K's first cases, before the rest is read
        return False
    n, cin, h, w = inp.shape
    return K.tma_loads(inp.element_size(), n, h, w, *inp.stride(), cin, weight.shape[0], *weight.stride(),
                       aligned_bases=True)


def aligned_bases(inp: torch.Tensor, weight: torch.Tensor) -> bool:
    """Both base addresses 16-byte aligned: ``tma_loads``' rule that reads the data pointers."""
    return inp.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


def resident_reduction(inp: torch.Tensor) -> int:
    """The reduction size (inp's channels) for which an eager launch is offered the weight-stationary
    configs (``K.resident_fwd_configs``), or 0: x (the forward's, or dx's dy) must have unit channel
    stride (each pixel's channels one contiguous run: channels_last). Never in a trace, whose
    compiled variants (symbolic sizes, no divisibility hints) have not been compiled ahead of time."""
    if _traced(inp) or inp.stride(1) != 1:
        return 0
    return inp.shape[1]


def _torch_scratch(size: int, alignment: int, stream):
    """triton's global-scratch allocator, through torch's caching allocator (blocks are 512-byte
    aligned; the kernel runs on the current device and stream, as the allocation)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give triton an allocator for the global scratch of kernels that build TMA descriptors on the
    device (256 bytes per program for the forward's two), unless one is set already (the user's).
    triton keeps it in a context variable, so a thread that has not set one has none: checked at
    every TMA launch (eager only: ``tma_loads``)."""
    from triton.runtime import _allocation
    try:
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except AttributeError:   # another triton layout: set ours
        unset = True
    if unset:
        import triton
        triton.set_allocator(_torch_scratch)


def tune_key(m, *unit_strides: bool) -> int:
    """``K.tune_key`` of an M that may be symbolic. While torch.compile or torch.export traces the op
    with a symbolic M (dynamic shapes), its power-of-two bucket would pin M (bit_length needs the
    value), so the key then carries the layout bits only: inductor launches the recorded autotuner's
    configs with its own tuning (it takes ``kernel.configs`` and ``kernel.fn``; the key is not read)."""
    if isinstance(m, torch.SymInt):
        return K.tune_key(1, *unit_strides) % 8
    return K.tune_key(m, *unit_strides)


_DEVICE_FACTS = {}   # CUDA device index -> (arch, multiprocessor count): queried once per device


def _device_facts(device: torch.device) -> Tuple[str, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    facts = _DEVICE_FACTS.get(index)
    if facts is None:
        props = torch.cuda.get_device_properties(index)
        facts = _DEVICE_FACTS.setdefault(index, ("sm90" if props.major in (9, 10) else "sm80",
                                                 props.multi_processor_count))
    return facts


def _arch(device: torch.device) -> str:
    """Which config list a GPU gets: "sm90" (Hopper and datacenter Blackwell: wgmma-sized tiles,
    ~227 KB of shared memory) or "sm80" (Ampere/Ada and the rest; configs that do not fit a
    smaller-shared-memory part are skipped by the autotuner as out of resources)."""
    return _device_facts(device)[0]


def pixels_flatten(t: torch.Tensor) -> bool:
    """True when t's (h, w) dims flatten into one pixel index: stride(2) == W * stride(3)."""
    return t.shape[2] <= 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and conv_allows_tf32()


def config_kind(t: torch.Tensor) -> str:
    """The kind of config list a GEMM on t's dtype takes now (``lateral_kernels.operand_kind`` of its
    element size and, for fp32, whether eager conv2d may use TF32: ``conv_allows_tf32``)."""
    return K.operand_kind(t.element_size(), _allow_tf32(t.dtype))


# Every launch holds this lock (re-entrant), for two reasons:
# * the interpreter patches triton.language module-wide for each launch, so concurrent interpreted
#   launches from several Python threads break each other;
# * triton's Autotuner keeps the call's arguments in instance state (``self.nargs``: set when ``run``
#   starts, cleared when it ends, read by every benchmark of a config), so a call from a second thread
#   while a first one autotunes a new shape makes the first fail ("'NoneType' object is not a mapping").
# On a GPU the lock is held for the host side of one (asynchronous) launch only, and for the
# autotuning of a new shape, which other threads then wait for instead of breaking.
_LAUNCH_LOCK = threading.RLock()


def _launch(kernel, grid, args, meta, binary: bool = False):
    """kernel[grid](*args, **meta): directly under the interpreter, else through ``wrap_triton``
    (inside the registered op's eager body that is the kernel itself; under torch.compile tracing it
    records the launch in the graph). ``binary``: an eager launch made before runs its compiled
    binary directly (``_launch_binary``; FUSED_FPN_TRITON_EXPERIMENTAL)."""
    with _LAUNCH_LOCK:
        if interpreting():
            kernel[grid](*args, **meta)
        else:
            launcher = _launcher(kernel)
            seen = (kernel, _launch_variant(meta))
            if launcher is kernel:
                what = lambda: getattr(kernel, "__name__", "kernel")   # noqa: E731
                if binary and seen in _TUNED:
                    _launch_binary(kernel, grid, args, meta, seen, what)
                    return
                _refuse_first_launch_in_capture(seen, what)
                _refuse_unloaded_binary_in_capture(kernel, args, meta, what)
            launcher[grid](*args, **meta)
            if launcher is kernel:
                _TUNED.add(seen)


# Eager fast path of the autotuned kernels. triton's Autotuner.run rebuilds its cache key from all
# ~30 arguments at every call (a dict of them, a dtype string per tensor) before launching the config
# it chose. After the first launch of a key the launcher keeps that config and launches the JIT
# function with it itself. Only in eager: while torch.compile traces the op (wrap_triton returns a
# wrapper, not the kernel) the autotuner is recorded as before, and inductor launches it.
# Set FAST_LAUNCH = False to go through Autotuner.run at every call (benchmarks/launch_overhead.py
# times both).
FAST_LAUNCH = True
# What was launched eagerly at least once (tuned, and its kernel loaded): (autotuner, key, variant)
# or (kernel, variant), the variant being the launch's constexpr flags and the current device. A
# launch not in it raises inside a CUDA-graph capture; so does one whose binary, specialized by
# triton on its integer and pointer arguments, is not loaded (_refuse_unloaded_binary_in_capture).
_TUNED = set()
_CHOSEN = {}   # (autotuner, key, variant) of _TUNED -> the chosen config's launch kwargs (BLOCK_*, num_warps, ...)
# (autotuner, key) pairs the autotuner has chosen a config for: it does not benchmark them again (its
# cache ignores the constexpr flags and the device), so their configs are not all compiled again.
_TUNED_KEYS = set()


def _capturing() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device_index() -> int:
    """The current CUDA device's index (the launch's: the launchers run on their tensors' device),
    or -1 without CUDA."""
    return torch.cuda.current_device() if torch.cuda.is_available() else -1


def _launch_variant(meta: dict):
    """The constexpr flags of a launch (HAS_BIAS, X_FLAT, ...) and the current device: what, with the
    autotune key, selects a compiled binary, loaded on that device."""
    return tuple(meta.items()), _device_index()   # (each launcher builds its meta in one order)


def _refuse_first_launch_in_capture(seen, what) -> None:
    """RuntimeError, naming the shape ``what()``, when launch ``seen`` is not in _TUNED and the
    current stream is capturing (the one check of ``_launch`` and ``_launch_autotuned``)."""
    if seen not in _TUNED and _capturing():
        raise RuntimeError(
            f"fused_fpn triton backend: the first call for this shape ({what()}) is inside a CUDA-graph capture, "
            f"where its kernel can be neither autotuned (timing synchronizes) nor loaded. Run the same call "
            f"once before the capture (the usual warm-up), or capture backend='cuda'.")


def _refuse_unloaded_binary_in_capture(fn, args, meta, what) -> None:
    """While the current stream is capturing: RuntimeError, naming ``what()``, when the binary that
    ``fn[grid](*args, **meta)`` would launch (``fn`` a JIT function) is not loaded on this device. triton
    specializes a binary on its integer and pointer arguments too (a size or stride of 1 or a multiple
    of 16, a 16-byte aligned pointer), so a captured call whose tensors differ in these from the
    warm-up's needs its own binary: compiling it is host work (done here, and kept for the next call),
    loading it is not allowed in a capture (CUDA's "operation not permitted when stream is capturing")."""
    if not _capturing():
        return
    kernel = fn.run(*args, grid=None, warmup=True, **meta)
    if getattr(kernel, "module", True) is None:   # triton loads a compiled binary at its first launch
        raise RuntimeError(
            f"fused_fpn triton backend: this call ({what()}) is inside a CUDA-graph capture and needs a kernel "
            f"binary that no call before the capture loaded: its tensors' sizes, strides or data pointers differ "
            f"from the warm-up's where triton specializes (a size or stride of 1 or a multiple of 16, a 16-byte "
            f"aligned pointer). Warm up with tensors of the captured call's sizes, strides and alignment, or "
            f"capture backend='cuda'.")


# A registered op's body run without the dispatcher (fused_fpn/backends/triton.py: a plain eager call,
# ``direct_launch_allowed``) launches its kernels as the op's eager body does, without asking
# wrap_triton (which returns the kernel itself there): ``run_directly`` marks this thread meanwhile.
_DIRECT = threading.local()


def run_directly(body, *args):
    """body(*args) with this thread's launches going to the kernels themselves, not through
    ``wrap_triton``: for an op body that the caller knows runs eagerly on plain tensors (no trace,
    no dispatch mode). Cheaper than ``as_in_the_op_body`` (a thread-local flag, no context managers)."""
    previous = getattr(_DIRECT, "active", False)
    _DIRECT.active = True
    try:
        return body(*args)
    finally:
        _DIRECT.active = previous


def _launcher(kernel):
    """What a launch calls: the kernel itself inside ``run_directly``, else ``wrap_triton(kernel)``
    (the kernel in a registered op's eager body, a recording wrapper while torch.compile traces it)."""
    if getattr(_DIRECT, "active", False):
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


@contextlib.contextmanager
def as_in_the_op_body():
    """Launches inside the block run as in a registered op's eager body: wrap_triton's higher-order-op
    dispatch off in this thread (torch.library.triton_op turns it off there), so wrap_triton returns
    the kernel itself and an autotuned kernel takes the eager fast path. For callers of the launchers
    outside an op (diagnostics, tests); outside an op and this block, wrap_triton wraps the kernel in
    a higher-order op. A torch without the switch: nothing to turn off."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:
        switch = contextlib.nullcontext()
    else:
        switch = set_wrap_triton_enabled(False)
    with switch:
        yield


def _launch_autotuned(tuner, grid, args, meta, key, binary: bool = False):
    """tuner[grid](*args, **meta) for a compiled (not interpreted) launch. ``key`` must tell apart
    every call the autotuner would tell apart: its key arguments and the tensors' dtypes.
    ``binary``: on the fast path, the chosen config's compiled binary runs directly
    (``_launch_binary``; FUSED_FPN_TRITON_EXPERIMENTAL)."""
    with _LAUNCH_LOCK:
        launcher = _launcher(tuner)
        # the chosen config per key, launched directly only for constexpr flags launched before on this
        # device: a new flag set (HAS_TOP, PIX_ALIGN, ...) compiles a new binary, and a new device loads
        # one, which inside a capture must raise
        seen = (tuner, key, _launch_variant(meta))
        chosen = _CHOSEN.get(seen) if launcher is tuner else None
        if chosen is not None:   # (the autotuner would launch the same config)
            if FAST_LAUNCH and binary:
                _launch_binary(tuner.fn, grid, args, meta, seen, lambda: describe_key(tuner, key), chosen)
                _note_choice(tuner, key, chosen)
                return
            _refuse_unloaded_binary_in_capture(tuner.fn, args, {**meta, **chosen}, lambda: describe_key(tuner, key))
            if FAST_LAUNCH:
                tuner.fn.run(*args, grid=grid, warmup=False, **meta, **chosen)
                _note_choice(tuner, key, chosen)
                return
        if launcher is tuner:
            _refuse_first_launch_in_capture(seen, lambda: describe_key(tuner, key))
            if (tuner, key) not in _TUNED_KEYS:   # the autotuner will benchmark every config
                compile_configs_in_parallel(tuner, grid, args, meta)
        launcher[grid](*args, **meta)
        if launcher is tuner:
            _TUNED.add(seen)
            _TUNED_KEYS.add((tuner, key))
            config = tuner.best_config   # set by this call's Autotuner.run (we hold the lock)
            kwargs = config.all_kwargs()
            if config.pre_hook is None:
                _CHOSEN[seen] = kwargs
            _note_choice(tuner, key, kwargs)


# Experimental (FUSED_FPN_TRITON_EXPERIMENTAL; not yet run on a GPU): a launch the launcher made
# before runs the compiled binary that triton's JIT returned for it, without ``JITFunction.run``, which
# rebuilds the launch's specialization from every argument at every call (a type, an alignment and a
# divisibility test per argument, then a cache key; a whole JIT launch took 37 us of host time on the
# H200 machine, 2026-11-30). Kept per (launch, binary key): the launch is
# ``seen`` (kernel or autotuner, its key, the constexpr flags and the device) and the binary key holds
# everything else triton specializes on: each tensor's dtype and 16-byte alignment, and the exact
# value and type of every other argument. A new binary key goes through ``JITFunction.run`` (which
# compiles or finds the binary, launches it and returns it), and so does the launch's first call
# (the autotuner's). The launch itself is the last two lines of ``JITFunction.run`` (triton 3.6 and 3.8
# alike): the binary's launcher with its function, packed metadata, launch metadata and triton's launch
# hooks, on the current stream as triton's driver gives it. The grid is the one of the binary key's
# first launch: every caller's grid is a function of the launch and the binary key (sizes are
# arguments, the SM count is the device's). A JITFunction with pre-run hooks takes the JIT at every
# call. What the JIT would also do at each call and this does not: notice that a global a kernel read
# when it was compiled has changed, and read again what joins its cache key besides the arguments
# (triton's debug switch, its instrumentation mode, triton 3.8's stages-inspection hook): they count
# when a binary key is first seen.
BINARY_LAUNCH = True   # False: the switch's configs, launched through the JIT (launch_overhead.py times both)


class _BinaryLaunches(NamedTuple):
    """What one launch ``seen`` passes beside its positional arguments: how many of those lead with
    tensors, the constexpr arguments after them in signature order (each kernel parameter that is not
    positional, from the launch's kwargs or its default), the autotuner's choice they were made with
    (None for a fixed-config kernel, whose kwargs ``seen`` holds), and the binaries seen."""
    tensors: int
    constexprs: tuple
    chosen: Optional[dict]
    binaries: dict   # binary key -> (compiled kernel, its grid, the grid as 3 ints)


_BINARY_LAUNCHES: dict = {}   # seen -> _BinaryLaunches
_BINARIES_KEPT = 0   # binaries kept in all of _BINARY_LAUNCHES (at most _PLANS_MAX: then all are dropped)


def _current_stream(device: int):
    """The stream triton's JIT would launch on: its driver's current stream of ``device``."""
    from triton.runtime import driver
    return driver.active.get_current_stream(device)


def _binary_launches(fn, seen, args, kwargs, chosen) -> Optional[_BinaryLaunches]:
    """The ``_BinaryLaunches`` of ``seen`` made with ``chosen`` (at its first binary launch), or None
    when ``fn`` cannot be launched that way: it has pre-run hooks, or its tensor arguments are not the
    leading ones."""
    if getattr(fn, "pre_run_hooks", None):
        return None
    entry = _BINARY_LAUNCHES.get(seen)
    if entry is not None and entry.chosen is chosen:
        return entry
    import inspect
    tensors = 0
    while tensors < len(args) and isinstance(args[tensors], torch.Tensor):
        tensors += 1
    if any(isinstance(a, torch.Tensor) for a in args[tensors:]):
        return None
    params = list(inspect.signature(fn.fn).parameters.values())[len(args):]
    constexprs = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
    if any(c is inspect.Parameter.empty for c in constexprs):
        return None   # a parameter with no value: let the JIT raise its error
    entry = _BinaryLaunches(tensors, constexprs, chosen, {})
    _BINARY_LAUNCHES[seen] = entry
    return entry


def binary_key(args, tensors: int) -> tuple:
    """What triton specializes a launch's binary on beyond the kernel, its constexprs and the device:
    each of the ``tensors`` leading arguments' dtype and 16-byte alignment, and every other argument's
    value and type (the divisibility by 16 of an int, its equality to 1 and its 32- or 64-bit type
    are functions of the value; a bool, an int and a float of equal value hash alike, hence the type)."""
    scalars = args[tensors:]
    return (scalars, tuple(map(type, scalars)),
            tuple((t.dtype, t.data_ptr() % 16 == 0) for t in args[:tensors]))


def _grid3(grid) -> tuple:
    """A launch grid of 1 to 3 dimensions as 3 ints, missing ones 1 (as ``JITFunction.run`` pads it)."""
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def _launch_binary(fn, grid, args, meta, seen, what, chosen: Optional[dict] = None) -> None:
    """fn[grid](*args, **meta, **chosen) for a JIT function ``fn`` launched before as ``seen`` (an
    autotuner's, with its ``chosen`` config; None for a fixed-config kernel): the compiled binary of
    this binary key runs directly (see above), or, for a new binary key, ``JITFunction.run`` launches
    (inside a CUDA-graph capture: raises first if that binary is not loaded) and the binary it returns
    is kept. ``grid`` must be a function of ``seen`` and the binary key (it is read for a new binary key
    only). ``what()`` names the launch in errors."""
    launches = _BINARY_LAUNCHES.get(seen)
    if launches is None or launches.chosen is not chosen or getattr(fn, "pre_run_hooks", None) or \
            (key := binary_key(args, launches.tensors)) not in launches.binaries:
        _launch_new_binary(fn, grid, args, {**meta, **chosen} if chosen else meta, seen, what, chosen)
        return
    compiled, grid, grid3 = launches.binaries[key]
    all_args = args + launches.constexprs
    from triton import knobs
    stream = _current_stream(seen[-1][1])   # the launch's device (_launch_variant), current in _run_on_device
    compiled.run(grid3[0], grid3[1], grid3[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *all_args),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *all_args)


def _launch_new_binary(fn, grid, args, kwargs, seen, what, chosen) -> None:
    """``_launch_binary`` of a binary key not seen before: through ``JITFunction.run``, keeping the
    binary it returns (when ``fn`` can be launched that way: ``_binary_launches``)."""
    global _BINARIES_KEPT
    _refuse_unloaded_binary_in_capture(fn, args, kwargs, what)
    launches = _binary_launches(fn, seen, args, kwargs, chosen)
    if launches is None:
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        return
    if callable(grid):   # as the JIT calls it: with every parameter's value by name
        grid = grid(dict(zip(fn.arg_names, args + launches.constexprs)))
    compiled = fn.run(*args, grid=grid, warmup=False, **kwargs)
    if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        if _BINARIES_KEPT >= _PLANS_MAX:   # bounded: drop them all (the next calls take the JIT again)
            _BINARY_LAUNCHES.clear()
            _BINARIES_KEPT = 0
            launches = _binary_launches(fn, seen, args, kwargs, chosen)
        launches.binaries[binary_key(args, launches.tensors)] = (compiled, grid, _grid3(grid))
        _BINARIES_KEPT += 1


# Parallel compilation of a new key's configs. triton's Autotuner.run compiles each config as it comes
# to benchmark it, one after another, and compiling is most of a new shape's first call (the H200
# bench of 2026-12-04: 96 s for one workload's two Triton providers). triton's AsyncCompileMode
# (3.6 and later) lets the JIT hand each compile to an executor; on threads they overlap, since
# MLIR's and LLVM's passes run without the GIL and ptxas is a subprocess. So before the autotuner's
# first run of a key, ``Autotuner.warmup`` compiles every config of the key's specialization on
# threads, and the autotuner's benchmarks then find each binary in the JIT's cache.
COMPILE_THREADS_ENV = "FUSED_FPN_TRITON_COMPILE_THREADS"


def compile_threads(configs: int) -> int:
    """How many threads compile a new key's ``configs``: FUSED_FPN_TRITON_COMPILE_THREADS if set (a
    whole number; 0 or 1 compiles in the autotuner, one config after another), else the CPUs this
    process may run on; never more than ``configs``. ValueError naming the variable otherwise."""
    value = os.environ.get(COMPILE_THREADS_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{COMPILE_THREADS_ENV} must be a whole number of threads (0 or 1: compile one "
                             f"config after another), got {value!r}")
        threads = int(value)
    else:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(threads, configs)


def compile_configs_in_parallel(tuner, grid, args, meta) -> bool:
    """Compile each config of autotuner ``tuner`` for the launch ``tuner[grid](*args, **meta)`` (the
    same specialization: argument dtypes, divisibility, constexprs) on ``compile_threads`` threads,
    without launching anything. True when it did; False, leaving the compiles to the autotuner, for
    fewer than 2 threads or configs, an interpreted kernel, a triton without ``AsyncCompileMode``, or
    one already active. A config that fails to compile raises nothing here: at the autotuner's launch
    of that config the JIT re-raises the error (triton 3.8 keeps the failed compile; 3.6 keeps none and
    compiles it again), and the autotuner handles it as before (out of resources, ptxas errors: the
    config is skipped). Anything else that fails here warns (RuntimeWarning) and returns False."""
    try:
        from triton.runtime import JITFunction
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return False
    configs = getattr(tuner, "configs", ())
    threads = compile_threads(len(configs))
    if threads < 2 or not isinstance(tuner.fn, JITFunction) or active_mode.get() is not None:
        return False
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads, thread_name_prefix="fused_fpn-triton-compile") as pool:
        mode = AsyncCompileMode(pool, ignore_errors=True)
        try:
            with mode:
                tuner.warmup(*args, grid=grid, **meta)
        except Exception as error:   # e.g. another triton's API: the autotuner compiles as before
            warnings.warn(f"fused_fpn: compiling the Triton configs of a new shape on {threads} threads failed "
                          f"({type(error).__name__}: {error}); the autotuner compiles them one after another "
                          f"(set {COMPILE_THREADS_ENV}=1 to skip this step)", RuntimeWarning, stacklevel=2)
            return False
        finally:
            if active_mode.get() is mode:   # triton 3.6 resets it only after every compile finalized
                active_mode.set(None)
    return True


# What the autotuner chose, for the benchmarks' results (which config ran on which level is what
# tells a tile-shape or persistent-config prediction from its refutation).
_RECORDERS: List[dict] = []   # one dict per active ``recording_autotune_choices`` block


def _note_choice(tuner, key, kwargs) -> None:
    for recorder in _RECORDERS:
        recorder.setdefault(describe_key(tuner, key), describe_config(kwargs))


_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_CO", "BLOCK_CI", "GROUP_M", "PERSISTENT", "TMA",
                  "RESIDENT_W", "num_warps", "num_stages")


def describe_config(kwargs: dict) -> str:
    """A config's launch kwargs as one short string: its tile sizes, swizzle group, persistence, TMA
    loads, resident weight, warps and pipeline stages, e.g. "BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 GROUP_M=8
    PERSISTENT=False TMA=False RESIDENT_W=False num_warps=8 num_stages=3"."""
    return " ".join(f"{k}={kwargs[k]}" for k in _CONFIG_FIELDS if kwargs.get(k) is not None)


def describe_key(tuner, key) -> str:
    """What an autotuner key (``_launch_autotuned``'s: TUNE_KEY, COUT, CIN, then the tensors' dtypes)
    means: which GEMM ("fwd": y = x . W^T + ..., "dx": dy . W, "dW": dy^T x), the layer's Cout and
    Cin, M's power-of-two bucket, which operands have unit channel stride ("cl"; "nchw" otherwise)
    and the first tensor's dtype, followed for fp32 by the tuner's kind ("tf32" or "ieee": which
    config list it tunes over), by "narrow" for the NARROW_* lists (``narrow_pixel_loads``) and by "tma"
    for a list with the TMA configs (experimental, ``tma_loads``). The key
    tells the forward from dx by the weight's Cin stride (as ``tune_key`` does), so a forward given a
    weight whose Cin stride is not 1 reads as "dx"."""
    tune, cout, cin = key[:3]
    bucket, bits = K.tune_key_parts(tune)
    dtype = str(key[3]).replace("torch.", "")
    kind = getattr(tuner, "fused_fpn_kind", "16bit")
    if kind != "16bit":
        dtype += f" {kind}"
    if getattr(tuner, "fused_fpn_narrow", False):
        dtype += " narrow"
    if getattr(tuner, "fused_fpn_tma", False):
        dtype += " tma"
    layout = lambda bit: "cl" if bits >> bit & 1 else "nchw"  # noqa: E731
    if getattr(tuner, "fused_fpn_name", "") == "dw":
        return f"dW Cout={cout} Cin={cin} M<={bucket} dy={layout(0)} x={layout(1)} {dtype}"
    if bits >> 2 & 1:   # the forward's W has unit Cin stride; dx = dy . W passes W.t()
        return f"fwd Cout={cout} Cin={cin} M<={bucket} x={layout(0)} out={layout(1)} {dtype}"
    # dx's GEMM: its "x" is dy (the layer's Cout channels), its output dx (the layer's Cin)
    return f"dx Cout={cin} Cin={cout} M<={bucket} dy={layout(0)} dx={layout(1)} {dtype}"


@contextlib.contextmanager
def recording_autotune_choices():
    """Collects which config each autotuned kernel launched with inside the block: yields a dict
    {describe_key(...): describe_config(...)} that fills as the block runs. Eager launches only:
    under torch.compile the compiled graph launches inductor's copy of the autotuner, not ours."""
    recorder: dict = {}
    with _LAUNCH_LOCK:
        _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        with _LAUNCH_LOCK:
            _RECORDERS.remove(recorder)


def _run_on_device(t: torch.Tensor, fn, *args) -> None:
    """fn(*args) with t's device current (triton launches on the current device and torch's current
    stream); no device switch when it already is (the common, single-GPU case)."""
    index = t.device.index
    if t.device.type != "cuda" or index is None or index == torch.cuda.current_device():
        fn(*args)
    else:
        with torch.cuda.device(index):
            fn(*args)


class LaunchPlan(NamedTuple):
    """What a compiled launch derives from its tensors' sizes, strides, dtypes and device facts: the
    kernel's scalar arguments after the tensors (``scalars``), its constexpr flags (``meta``), the
    config kind (``config_kind``), whether it takes the narrow config lists (``narrow``), its grid
    (a tuple, or a function of the config for autotuned kernels) and the autotuner's key; the
    forward's also whether its operands' sizes and strides allow TMA loads (``tma_geometry``) and the
    reduction size it offers the weight-stationary configs (``resident_reduction``)."""
    scalars: tuple
    meta: dict
    kind: Optional[str]
    narrow: bool
    grid: object
    key: Optional[tuple]
    tma: bool = False
    resident_k: int = 0


# Eager launch plans, per signature: (launch name, the facts the caller names, each tensor's (shape,
# stride, dtype) or None). Building a plan cost ~15 us of Python per launch on the dev machine (two
# dozen stride reads, the nearest scales, the alignment and narrow-load rules); a known signature is
# one dict lookup. Only for plain tensors and Parameters: a trace's fake or functional tensors may have
# symbolic sizes, and their launches are recorded once per trace anyway. Bounded: cleared when full.
# A plan is shared by every launch of its signature (and threads): nothing may modify its meta dict.
_PLANS: dict = {}
_PLANS_MAX = 4096
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def launch_plan(name: str, tensors, facts: tuple, build) -> LaunchPlan:
    """``build()``, or the plan it built before for the same ``name``, tensor geometry and ``facts``
    (everything else the plan reads that can change: device facts, TF32 mode, test switches; module
    constants aside). The plan must be a pure function of those (no data pointers: alignment rules
    that read them stay outside; no environment switch: those are read per launch). Compiled launches
    only: the interpreter's are not kept."""
    if not all(t is None or type(t) in _PLAIN for t in tensors):
        return build()
    key = (name, facts) + tuple(None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors)
    plan = _PLANS.get(key)
    if plan is None:
        plan = build()
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def fwd_launch_args(inp: torch.Tensor, weight: torch.Tensor, bias, top, out: torch.Tensor):
    """(args, meta): the positional arguments and constexpr flags of ``_lateral_fwd_kernel`` for
    out = inp . weight^T + bias + nearest(top) (the config keys BLOCK_M/N/K, GROUP_M come on top)."""
    n, cin, h, w = inp.shape
    has_bias, has_top = bias is not None, top is not None
    ht, wt = (top.shape[2], top.shape[3]) if has_top else (1, 1)
    b_arg = bias if has_bias else weight      # dummies: never dereferenced (HAS_BIAS/HAS_TOP off)
    t_arg = top if has_top else inp
    t_strides = top.stride() if has_top else (0, 0, 0, 0)
    scale_h, scale_w, in_kernel = nearest_scale_args(ht, h, wt, w)
    args = (inp, weight, b_arg, t_arg, out,
            n * h * w, h * w, w, cin, weight.shape[0], ht, wt,
            scale_h, scale_w,
            *inp.stride(),
            weight.stride(0), weight.stride(1),
            bias.stride(0) if has_bias else 0,
            *t_strides,
            *out.stride(),
            tune_key(n * h * w, inp.stride(1) == 1, out.stride(1) == 1, weight.stride(1) == 1))
    meta = dict(HAS_BIAS=has_bias, HAS_TOP=has_top, X_FLAT=pixels_flatten(inp), O_FLAT=pixels_flatten(out),
                ALLOW_TF32=_allow_tf32(inp.dtype),
                USE_INPUT_PRECISION=USE_INPUT_PRECISION, SCALE_IN_KERNEL=in_kernel,
                PIX_ALIGN=pixel_alignment(inp.element_size(), h * w, inp.stride(0), inp.stride(1),
                                          out.stride(0), out.stride(1)))
    return args, meta


def gemm_epilogue(inp: torch.Tensor, weight: torch.Tensor, bias, top, out: torch.Tensor, *,
                  switch: Optional[bool] = None) -> torch.Tensor:
    """out[n, co, h, w] = sum_ci inp[n, ci, h, w] * weight[co, ci] + bias[co] + top[n, co, sh(h), sw(w)].

    inp [N, Cin, H, W], weight [Cout, Cin] (any strides: the backward passes W.t()), bias [Cout]
    or None, top [N, Cout, Ht, Wt] or None, out [N, Cout, H, W] preallocated (any strides).
    ``switch``: FUSED_FPN_TRITON_EXPERIMENTAL as the caller read it (``K.experimental_enabled()``,
    read here when None)."""
    n, cin, h, w = inp.shape
    cout = weight.shape[0]
    m = n * h * w
    if m == 0 or cout == 0:
        return out
    if interpreting():
        args, meta = fwd_launch_args(inp, weight, bias, top, out)
        cfg = K.INTERPRET_FWD
        grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(cout, cfg["BLOCK_N"]),)
        _launch(K._lateral_fwd_kernel, grid, args, dict(meta, **cfg))
        return out
    arch, sms = _device_facts(inp.device)
    tensors = (inp, weight, bias, top, out)
    plan = launch_plan("fwd", tensors, (arch, sms, _allow_tf32(inp.dtype), FORCE_SCALE_IN_KERNEL),
                       lambda: _fwd_plan(inp, weight, bias, top, out, sms))
    args = (inp, weight, weight if bias is None else bias, inp if top is None else top, out) + plan.scalars
    # the switch read once per launch (~1 us), or once per backward by lateral_backward
    if switch is None:
        switch = K.experimental_enabled()
    binary = switch and BINARY_LAUNCH
    experimental = switch and not plan.narrow
    tma = experimental and plan.tma and (arch, plan.kind) in K.TMA_FWD_CONFIGS and aligned_bases(inp, weight)
    resident_k = plan.resident_k if experimental and (arch, plan.kind) in K.RESIDENT_FWD_CONFIGS else 0
    kernel = K.autotuned_fwd(arch, plan.kind, plan.narrow, tma, experimental, resident_k)
    if kernel.fused_fpn_tma:
        ensure_scratch_allocator()
    _run_on_device(inp, _launch_autotuned, kernel, plan.grid, args, plan.meta, plan.key, binary)
    return out


def _fwd_plan(inp, weight, bias, top, out, sms: int) -> "LaunchPlan":
    """The forward's ``LaunchPlan`` (compiled kernels): ``fwd_launch_args``' scalars and flags, the
    config kind, whether x's pixel loads are narrow, the grid (one program per output tile; persistent
    configs: at most one per SM) and the autotuner's key (TUNE_KEY, COUT, CIN, the five tensors' dtypes)."""
    args, meta = fwd_launch_args(inp, weight, bias, top, out)
    m, cin, cout = args[5], args[8], args[9]

    def grid(meta):
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(cout, meta["BLOCK_N"])
        if meta.get("RESIDENT_W"):
            if cin > meta["BLOCK_K"]:   # the kernel would leave out channels past BLOCK_K: refuse it
                raise ValueError(f"a RESIDENT_W config needs Cin <= BLOCK_K, got Cin {cin} and {describe_config(meta)}")
            return (K.resident_grid(tiles, cdiv(cout, meta["BLOCK_N"]), sms),)
        return (torch.sym_min(tiles, sms) if meta["PERSISTENT"] else tiles,)
    key = (args[-1], cout, cin) + tuple(t.dtype for t in args[:5])
    return LaunchPlan(args[5:], meta, config_kind(inp), narrow_pixel_loads((inp,), meta["PIX_ALIGN"]), grid, key,
                      tma_geometry(inp, weight), resident_reduction(inp))


def lateral_forward(x: torch.Tensor, weight: torch.Tensor, bias, top) -> torch.Tensor:
    """y = x . W^T + b + nearest(top, size=x.shape[-2:]) in one launch; y in x's memory format."""
    n, _, h, w = x.shape
    out = torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x))
    return gemm_epilogue(x, weight, bias, top, out)


def _grad_weight_split(m: int, tiles: int, device: torch.device) -> Tuple[int, int]:
    """(split, rows_per_split): how many fp32 partial sums dW is reduced from. A fixed function of
    the shape and the device, so the summation order (and the result) is reproducible."""
    if interpreting():
        rows = max(64, cdiv(cdiv(m, 3), 64) * 64)
    else:
        sms = _device_facts(device)[1]
        # sym_min / sym_max: plain min / max on ints; on a symbolic m they keep it symbolic
        split = torch.sym_max(1, torch.sym_min(torch.sym_min(cdiv(2 * sms, tiles), cdiv(m, 1024)),
                                               MAX_GRAD_WEIGHT_SPLIT))
        rows = cdiv(cdiv(m, split), 256) * 256
    return cdiv(m, rows), rows


def grad_weight(grad: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype, *,
                switch: Optional[bool] = None) -> torch.Tensor:
    """dW[co, ci] = sum over pixels of grad[n, co, h, w] * x[n, ci, h, w], fp32 accumulation,
    split over pixels into partial sums that are added in a fixed order (no atomics). ``switch``: as
    ``gemm_epilogue``'s."""
    n, cin, h, w = x.shape
    cout = grad.shape[1]
    m = n * h * w
    if m == 0 or cin == 0 or cout == 0:
        return torch.zeros((cout, cin), dtype=out_dtype, device=x.device)
    if interpreting():
        plan = _grad_weight_plan(grad, x, "interpret")
    else:
        arch, sms = _device_facts(x.device)
        plan = launch_plan("dw", (grad, x), (arch, sms, _allow_tf32(x.dtype)),
                           lambda: _grad_weight_plan(grad, x, arch))
    split = plan.grid[1]
    part = torch.empty((split, cout, cin), dtype=torch.float32, device=x.device)
    args = (grad, x, part) + plan.scalars
    if plan.kind is None:
        _launch(K._lateral_grad_weight_kernel, plan.grid, args, dict(plan.meta, **K.INTERPRET_GRAD_WEIGHT))
    else:
        kernel = K.autotuned_grad_weight(arch, plan.kind, plan.narrow)
        _run_on_device(x, _launch_autotuned, kernel, plan.grid, args, plan.meta, plan.key,
                       BINARY_LAUNCH and (K.experimental_enabled() if switch is None else switch))
    if split == 1:   # one partial sum: no reduction launch (a cast, or nothing for fp32)
        return part[0].to(out_dtype)
    return part.sum(dim=0).to(out_dtype)


def _grad_weight_plan(grad, x, arch: str) -> "LaunchPlan":
    """The weight gradient's ``LaunchPlan`` on ``arch`` ("interpret": the interpreter's tile, kind
    None): the kernel's scalars after (grad, x, part), its flags, the grid (tiles, split: the number
    of fp32 partial sums, ``_grad_weight_split``) and, compiled, the config kind, whether dy's or x's
    pixel loads are narrow and the autotuner's key (TUNE_KEY, COUT, CIN, the dtypes of grad, x, part)."""
    n, cin, h, w = x.shape
    cout = grad.shape[1]
    m = n * h * w
    mode = "interpret" if arch == "interpret" else "gpu"
    bco, bci = K.GRAD_WEIGHT_TILE[mode]
    tiles = cdiv(cout, bco) * cdiv(cin, bci)
    split, rows = _grad_weight_split(m, tiles, x.device)
    scalars = (m, h * w, w, cin, cout, rows, *grad.stride(), *x.stride(),
               tune_key(m, grad.stride(1) == 1, x.stride(1) == 1))
    meta = dict(D_FLAT=pixels_flatten(grad), X_FLAT=pixels_flatten(x), ALLOW_TF32=_allow_tf32(x.dtype),
                USE_INPUT_PRECISION=USE_INPUT_PRECISION,
                PIX_ALIGN=pixel_alignment(x.element_size(), h * w, *grad.stride()[:2], *x.stride()[:2],
                                          whole_vectors=True))
    if mode == "interpret":
        return LaunchPlan(scalars, meta, None, False, (tiles, split), None)
    key = (scalars[-1], cout, cin, grad.dtype, x.dtype, torch.float32)
    return LaunchPlan(scalars, meta, config_kind(x), narrow_pixel_loads((grad, x), meta["PIX_ALIGN"]),
                      (tiles, split), key)


def grad_bias_top(grad: torch.Tensor, top_h: int, top_w: int, need_top: bool, *, switch: Optional[bool] = None):
    """(db [C] fp32-accumulated in grad's dtype, dtop [N, C, top_h, top_w] in grad's memory format
    or None) in one pass over grad. top_h == 0 means there is no top (only db). ``switch``: as
    ``gemm_epilogue``'s."""
    n, c, h, w = grad.shape
    has_top = need_top and top_h > 0 and top_w > 0
    empty = n * h * w == 0 or c == 0
    ht, wt = (top_h, top_w) if has_top else (h, w)
    cfg = K.INTERPRET_GRAD_BIAS_TOP if interpreting() else K.GRAD_BIAS_TOP_META
    n_tw = cdiv(wt, cfg["BLOCK_TW"])
    rows = n * ht * n_tw
    programs = rows * cdiv(c, cfg["BLOCK_C"])
    if not empty and programs > MAX_PROGRAMS:
        what = f"a top of {top_h} x {top_w}" if has_top else "no top (its pixels are walked as a top's)"
        raise ValueError(f"grad {tuple(grad.shape)} with {what}: the triton bias / top gradient needs {programs} "
                         f"programs (N * {ht} * ceil({wt} / {cfg['BLOCK_TW']}) * ceil(C / {cfg['BLOCK_C']})), more "
                         f"than one launch takes ({MAX_PROGRAMS})")
    fmt = output_memory_format(grad)
    dtop = (torch.empty((n, c, top_h, top_w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
            if need_top else None)
    if empty:
        if dtop is not None:
            dtop.zero_()
        return torch.zeros((c,), dtype=grad.dtype, device=grad.device), dtop
    dbpart = torch.empty((rows, c), dtype=torch.float32, device=grad.device)
    t_arg = dtop if has_top else dbpart
    t_strides = dtop.stride() if has_top else (0, 0, 0, 0)
    scale_h, scale_w, in_kernel = nearest_scale_args(ht, h, wt, w)
    iter_h, iter_w = (0, 0) if in_kernel else (int(h).bit_length() + 1, int(w).bit_length() + 1)
    args = (grad, t_arg, dbpart,
            h, w, ht, wt, c, n_tw, rows,
            scale_h, scale_w, iter_h, iter_w,
            *grad.stride(), *t_strides)
    meta = dict(HAS_TOP=has_top, SCALE_IN_KERNEL=in_kernel, **cfg)
    if not interpreting():
        meta.update(K.GRAD_BIAS_TOP_LAUNCH)
    _run_on_device(grad, _launch, K._lateral_grad_bias_top_kernel, (programs,), args, meta,
                   BINARY_LAUNCH and (K.experimental_enabled() if switch is None else switch))
    return dbpart.sum(dim=0).to(grad.dtype), dtop


def lateral_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, top_h: int, top_w: int,
                     need_x: bool, need_w: bool, need_b: bool, need_top: bool):
    """(dx, dW, db, dtop) of y = x . W^T + b + U(top); an unneeded gradient is an empty [0] tensor.

    dx = dy . W (the forward GEMM kernel with W transposed through its strides; dx in x's memory
    format), dW (``grad_weight``), db and dtop (``grad_bias_top``, one pass over dy)."""
    def empty():  # a fresh [0] tensor for each unneeded gradient (outputs must not alias)
        return grad.new_empty((0,))
    dx, dw, db, dtop = empty(), empty(), empty(), empty()
    switch = K.experimental_enabled()   # read once for the three launches
    if need_x:
        # an empty reduction (Cout == 0) still launches and writes zeros
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
        gemm_epilogue(grad, weight.t(), None, None, dx, switch=switch)
    if need_w:
        dw = grad_weight(grad, x, weight.dtype, switch=switch)
    if need_b or need_top:
        b, t = grad_bias_top(grad, top_h, top_w, need_top, switch=switch)
        db = b if need_b else db
        dtop = t if need_top else dtop
    return dx, dw, db, dtop
