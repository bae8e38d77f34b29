"""benchmarks/kernel_profile.py's summary side (no GPU): parsing ncu's raw CSV, units, stall reasons,
and labelling ncu's kernel rows with the plan's regions. The profiled runs themselves need a GPU and
ncu (gpu_run.sh's ncu step)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kernel_profile as kp  # noqa: E402

STALL = "smsp__average_warp_latency_issue_stalled_{}_per_issue_active.ratio"
COLUMNS = ["ID", "Kernel Name", "Grid Size", "gpu__time_duration.sum", "dram__bytes_read.sum",
           "dram__bytes_write.sum", "launch__shared_mem_per_block_dynamic", STALL.format("long_scoreboard"),
           STALL.format("barrier"), STALL.format("math_pipe_throttle")]


def _csv(rows, units=None, preamble=("==PROF== Connected to process 123 (python3)",)):
    def line(cells):
        return ",".join(f'"{c}"' for c in cells)
    out = list(preamble) + [line(COLUMNS)]
    if units is not None:
        out.append(line([""] + units))
    out += [line(r) for r in rows]
    return "\n".join(out) + "\n==PROF== Disconnected from process 123\n"


UNITS = ["", "", "usecond", "Mbyte", "Mbyte", "Kbyte", "", "", ""]
ROWS = [   # deliberately out of ID order: the parser sorts by ID
    ["2", "void fused_fpn::cuda::lateral_fwd_kernel<__half, MathWmma>(LateralFwdParams)", "(1900, 1, 1)",
     "100.5", "60", "30", "71.68", "3.5", "9.25", "0.5"],
    ["1", "_lateral_fwd_kernel", "(475, 1, 1)", "72", "62", "31", "147.456", "1,234.5", "0", "2"],
    ["3", "void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>(int, ...)", "(10, 1, 1)",
     "2", "0", "1", "0", "0.1", "0", "0"],
]


def test_parse_sorts_by_id_and_reads_the_units_row():
    rows, units = kp.parse_ncu_raw_csv(_csv(ROWS, UNITS))
    assert [r["ID"] for r in rows] == ["1", "2", "3"]
    assert units["gpu__time_duration.sum"] == "usecond" and units["dram__bytes_read.sum"] == "Mbyte"


def test_parse_without_header_raises():
    with pytest.raises(ValueError, match="no ncu raw CSV header"):
        kp.parse_ncu_raw_csv("==PROF== nothing profiled\n")


def test_metric_units_and_base_unit_default():
    rows, units = kp.parse_ncu_raw_csv(_csv(ROWS, UNITS))
    r = rows[1]   # ID 2
    assert kp.metric(r, units, "gpu__time_duration.sum", "time") == pytest.approx(100.5)       # usecond -> us
    assert kp.metric(r, units, "dram__bytes_read.sum", "bytes") == pytest.approx(60.0)          # Mbyte -> MB
    assert kp.metric(r, units, "launch__shared_mem_per_block_dynamic", "kbytes") == pytest.approx(71.68)
    assert kp.metric(r, units, "sm__throughput.avg.pct_of_peak_sustained_elapsed", "plain") is None
    assert kp.metric(r, units, "no_such_metric|dram__bytes_write.sum", "bytes") == pytest.approx(30.0)
    rows, units = kp.parse_ncu_raw_csv(_csv(ROWS))   # no units row: nsecond and byte
    assert units == {}
    assert kp.metric(rows[1], units, "gpu__time_duration.sum", "time") == pytest.approx(0.1005)
    assert kp.metric(rows[1], units, "dram__bytes_read.sum", "bytes") == pytest.approx(60e-6)


def test_top_stalls_are_the_largest_reasons():
    rows, _ = kp.parse_ncu_raw_csv(_csv(ROWS, UNITS))
    assert kp.top_stalls(rows[0], 2) == [("long_scoreboard", 1234.5), ("math_pipe_throttle", 2.0)]
    assert kp.top_stalls(rows[1]) == [("barrier", 9.25), ("long_scoreboard", 3.5), ("math_pipe_throttle", 0.5)]


def test_regions_label_the_rows_in_order_and_mismatches_are_reported():
    rows, _ = kp.parse_ncu_raw_csv(_csv(ROWS, UNITS))
    plan = [{"label": "P2 triton", "kernels": ["_lateral_fwd_kernel"]},
            {"label": "P2 cuda", "kernels": ["void fused_fpn::cuda::lateral_fwd_kernel<__half, MathWmma, "
                                             "ChannelsLast, true, true>(fused_fpn::cuda::LateralFwdParams)",
                                             "void at::native::vectorized_elementwise_kernel<4>(int)"]}]
    labelled, problems = kp.assign_regions(plan, rows)
    assert [label for label, _ in labelled] == ["P2 triton", "P2 cuda", "P2 cuda"] and problems == []
    plan[0]["kernels"] = ["triton_poi_fused_add_0"]
    labelled, problems = kp.assign_regions(plan, rows)
    assert len(problems) == 1 and "triton_poi_fused_add_0" in problems[0] and "_lateral_fwd_kernel" in problems[0]
    labelled, problems = kp.assign_regions(plan[:1], rows)
    assert [label for label, _ in labelled] == ["P2 triton", "(unplanned)", "(unplanned)"]
    assert any("expects 1 kernels, ncu profiled 3" in p for p in problems)


def test_summarize_end_to_end(tmp_path, capsys):
    plan = {"regions": [{"label": "P2 triton", "kernels": ["_lateral_fwd_kernel"]},
                        {"label": "P2 cuda", "kernels": ["fused_fpn::cuda::lateral_fwd_kernel<__half>",
                                                         "at::native::vectorized_elementwise_kernel<4>"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "ncu.csv").write_text(_csv(ROWS, UNITS))
    assert kp.main(["--summarize", str(tmp_path / "ncu.csv"), "--plan", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    triton_row = next(line for line in text.splitlines() if line.startswith("P2 triton") and "_lateral" in line)
    assert " 1292 " in triton_row        # (62 + 31) MB / 72 us = 1291.7 GB/s
    assert "long_scoreboard 1234.5" in triton_row
    assert "P2 cuda        kernels' duration in all:     102.5 us" in text
    assert "WARNING" not in text


def test_region_arguments_are_checked():
    assert kp.harness.parse_levels("p5,P2") == [0, 3]
    for bad in ("P6", ""):
        with pytest.raises(Exception, match="levels are P2, P3, P4, P5"):
            kp.harness.parse_levels(bad)
    with pytest.raises(Exception, match="providers are eager, compile, cuda, triton"):
        kp._providers("eager,cudnn")
    args = kp.ncu_args()
    assert args[:4] == ["--profile-from-start", "off", "--clock-control", "none"]
    assert args[args.index("--metrics") + 1].split(",") == list(kp.NCU_METRICS)


def test_regions_on_cpu_eager_forward_and_backward():
    """build_regions' labels and calls (eager only: the fused GPU backends and torch.compile need the
    GPU machine), forward and backward pieces, on CPU tensors of the GPU shapes' P5 (smallest level)."""
    import torch
    regions = kp.build_regions([3], ["eager"], "fp32", "channels_last", backward=True, device="cpu")
    assert [label for label, _ in regions] == ["P5 eager", "P5 eager bwd dx+dW+db"]   # P5 has no top map
    y = regions[0][1]()
    assert y.shape == (2, 256, 25, 38) and y.is_contiguous(memory_format=torch.channels_last)
    dx, dw, db = regions[1][1]()
    assert dx.shape == (2, 2048, 25, 38) and dw.shape == (256, 2048, 1, 1) and db.shape == (256,)
    labels = [label for label, _ in kp.build_regions([2], ["eager"], "fp32", "nchw", backward=True, device="cpu")]
    assert labels == ["P4 eager", "P4 eager bwd dx+dW+db", "P4 eager bwd dtop"]
