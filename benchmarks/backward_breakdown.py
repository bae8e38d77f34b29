"""GPU time of each piece of the lateral backward, level by level, against the bytes each piece must move:

    python benchmarks/backward_breakdown.py [--dtype fp16] [--layout channels_last] [--graphs]
                                            [--backends cuda,triton] [--levels P2,P5] [--json FILE]

For each level P2..P5 of the GPU benchmark's shapes (batch 2, 800x1216, ResNet-50 channels -> 256) and an
incoming gradient dy of the level's output, the pieces of one backward, timed together:

    eager   conv backward      aten.convolution_backward (dx, dW, db; cuDNN), torchvision's backward
            upsample backward  aten.upsample_nearest2d_backward (dtop; levels with a top map)
    cuda    dx / dW            fused_fpn::conv1x1_backward with one of need_x / need_weight (cuBLAS)
            db + dtop          fused_fpn::lateral_grad_bias_top (one fused pass over dy)
    triton  dx / dW / db+dtop  fused_fpn::triton_lateral_backward with one need flag (two for db+dtop)
            all four           the same op with every flag, as a training step calls it

Each row: median ms (CUDA events, pieces interleaved, input sets rotated past L2; CUDA-graph replays with
--graphs), the fewest bytes that piece must move (``piece_bytes``), and GB/s and % of the copy ceiling
measured in the same run. Per level the table ends with the sums of each backend's pieces and the
single-pass floor: dy and x read once, dx, dW, db and dtop written once. So it shows which piece is far
from the bandwidth floor, and how much a backward that reads dy once could gain over the pieces.

A diagnostic for the GPU machine, like ``host_profile.py`` (it needs CUDA); ``pytest benchmarks`` is the
comparison. With the Triton backend the first call of each shape autotunes (a minute or more in all).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fused_fpn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import harness  # noqa: E402


def piece_bytes(n: int, cin: int, h: int, w: int, cout: int, top_hw: Optional[Tuple[int, int]],
                elem_bytes: int) -> Dict[str, int]:
    """Fewest bytes each backward piece of y = conv1x1(x) + b + nearest(top) moves (every tensor read or
    written once, at ``elem_bytes`` per element; fp32 partial sums not counted):

        dx         read dy, W; write dx              dW      read dy, x; write dW
        db         read dy; write db                 dtop    read dy; write dtop
        db+dtop    read dy once; write db, dtop      single  read dy, x, W once; write dx, dW, db, dtop
    """
    dy = n * cout * h * w
    x = n * cin * h * w
    wgt = cout * cin
    top = n * cout * top_hw[0] * top_hw[1] if top_hw is not None else 0
    elems = {
        "dx": dy + wgt + x,
        "dW": dy + x + wgt,
        "db": dy + cout,
        "dtop": dy + top if top_hw is not None else 0,
        "db+dtop": dy + cout + top,
        "single": dy + x + wgt + x + wgt + cout + top,
    }
    return {k: v * elem_bytes for k, v in elems.items()}


def level_pieces(backends: List[str], cout: int, top_hw: Optional[Tuple[int, int]], weight: torch.Tensor
                 ) -> List[Tuple[str, str, Callable]]:
    """(provider, piece, fn(x, dy)) of one level; ``piece`` names its entry of ``piece_bytes`` (or a sum)."""
    th, tw = top_hw if top_hw is not None else (0, 0)
    w4 = weight[:, :, None, None]
    pieces: List[Tuple[str, str, Callable]] = [
        ("eager", "dx+dW+db", lambda x, dy: torch.ops.aten.convolution_backward(
            dy, x, w4, [cout], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])),
    ]
    if top_hw is not None:
        pieces.append(("eager", "dtop", lambda x, dy: torch.ops.aten.upsample_nearest2d_backward(
            dy, [dy.shape[2], dy.shape[3]], [dy.shape[0], cout, th, tw])))
    if "cuda" in backends:
        op = torch.ops.fused_fpn
        pieces += [
            ("cuda", "dx", lambda x, dy: op.conv1x1_backward(dy, x, weight, True, False, True)),
            ("cuda", "dW", lambda x, dy: op.conv1x1_backward(dy, x, weight, False, True, True)),
            ("cuda", "db+dtop", lambda x, dy: op.lateral_grad_bias_top(dy, th, tw)),
        ]
    if "triton" in backends:
        from fused_fpn.backends import triton as tb
        bwd = tb.ops()[1]
        pieces += [
            ("triton", "dx", lambda x, dy: bwd(dy, x, weight, th, tw, True, False, False, False)),
            ("triton", "dW", lambda x, dy: bwd(dy, x, weight, th, tw, False, True, False, False)),
            ("triton", "db+dtop", lambda x, dy: bwd(dy, x, weight, th, tw, False, False, True, top_hw is not None)),
            ("triton", "all four", lambda x, dy: bwd(dy, x, weight, th, tw, True, True, True, top_hw is not None)),
        ]
    return pieces


def piece_floor(piece: str, nbytes: Dict[str, int]) -> int:
    """Fewest bytes of a row: its own entry, or the sum of the separate passes it stands for."""
    if piece == "dx+dW+db":
        return nbytes["dx"] + nbytes["dW"] + nbytes["db"]
    if piece == "all four":
        return nbytes["dx"] + nbytes["dW"] + nbytes["db+dtop"]
    return nbytes[piece]


def run_level(i: int, shapes: harness.Shapes, dtype: torch.dtype, layout: str, backends: List[str],
              graphs: bool, ceiling: harness.Ceiling) -> List[dict]:
    n, cin, cout = shapes.batch, shapes.in_channels[i], shapes.out_channels
    h, w = shapes.level_hw(i)
    top_hw = shapes.level_hw(i + 1) if i + 1 < shapes.levels else None
    g = torch.Generator().manual_seed(i)
    weight = (torch.randn((cout, cin), generator=g) / cin ** 0.5).to("cuda", dtype)
    nbytes = piece_bytes(n, cin, h, w, cout, top_hw, weight.element_size())
    sets, _ = harness.rotated_input_sets(
        lambda: (harness._fmt(torch.randn((n, cin, h, w), device="cuda", dtype=dtype), layout),
                 harness._fmt(torch.randn((n, cout, h, w), device="cuda", dtype=dtype), layout)),
        "cuda", harness.GPU_TIMING)
    pieces = level_pieces(backends, cout, top_hw, weight)
    fns = {f"{provider}: {piece}": fn for provider, piece, fn in pieces}
    timings = harness.time_interleaved(fns, sets, "cuda", harness.GPU_TIMING, graphs=graphs)
    rows = []
    for provider, piece, _ in pieces:
        t = timings[f"{provider}: {piece}"]
        floor = piece_floor(piece, nbytes)
        gbs, pct = harness.roofline(floor, t.median_s, ceiling.bytes_per_s)
        rows.append({"level": f"P{i + 2}", "provider": provider, "piece": piece, "median_ms": t.median_s * 1e3,
                     "min_bytes": floor, "gb_s": gbs, "pct_ceiling": pct})
    for provider in ("eager",) + tuple(b for b in ("cuda", "triton") if b in backends):
        parts = [r for r in rows if r["provider"] == provider and r["piece"] != "all four"]
        rows.append({"level": f"P{i + 2}", "provider": provider, "piece": "sum of the pieces",
                     "median_ms": sum(r["median_ms"] for r in parts),
                     "min_bytes": sum(r["min_bytes"] for r in parts), "gb_s": None, "pct_ceiling": None})
    single_s = nbytes["single"] / ceiling.bytes_per_s
    rows.append({"level": f"P{i + 2}", "provider": "floor", "piece": "single pass at the ceiling",
                 "median_ms": single_s * 1e3, "min_bytes": nbytes["single"], "gb_s": None, "pct_ceiling": None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16", choices=sorted(harness.DTYPES))
    parser.add_argument("--layout", default="channels_last", choices=harness.LAYOUTS)
    parser.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (kernel time alone)")
    parser.add_argument("--backends", default="cuda,triton", help="fused backends to break down (comma list)")
    parser.add_argument("--levels", type=harness.parse_levels, default=[0, 1, 2, 3], metavar="P2,P3,P4,P5",
                        help="which levels (default: all four)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("backward_breakdown.py needs a CUDA device", file=sys.stderr)
        return 2
    available = fused_fpn.available_backends("cuda")
    backends = [b for b in args.backends.split(",") if b]
    missing = [b for b in backends if b not in ("cuda", "triton") or b not in available]
    if missing:
        print(f"--backends: {missing} cannot run here (available fused GPU backends: "
              f"{[b for b in available if b in ('cuda', 'triton')]})", file=sys.stderr)
        return 2
    dtype = harness.DTYPES[args.dtype]
    ceiling = harness.measure_copy_ceiling("cuda")
    shapes = harness.GPU_SHAPES
    print(f"backward pieces, {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} {args.layout}, "
          f"{shapes.describe()}; {'CUDA-graph replays' if args.graphs else 'eager calls'}, CUDA events; "
          f"copy ceiling {ceiling.bytes_per_s / 1e9:.0f} GB/s ({ceiling.method})")
    rows, configs = [], {}
    for i in args.levels:
        with harness.recording_triton_choices() as chosen:   # the configs the triton pieces ran with
            level_rows = run_level(i, shapes, dtype, args.layout, backends, args.graphs, ceiling)
        rows += level_rows
        configs[f"P{i + 2}"] = dict(chosen)
        for r in level_rows:
            pct = f"{r['gb_s']:7.0f} GB/s {r['pct_ceiling']:5.1f} %" if r["gb_s"] is not None else ""
            print(f"  {r['level']}  {r['provider']:<7s} {r['piece']:<27s} {r['median_ms']:8.4f} ms "
                  f"{r['min_bytes'] / 1e6:8.1f} MB  {pct}")
        for launch, config in chosen.items():
            print(f"  P{i + 2}  triton autotune: {launch}: {config}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "layout": args.layout,
                       "graphs": args.graphs, "ceiling_gb_s": ceiling.bytes_per_s / 1e9, "rows": rows,
                       "triton_configs": configs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
