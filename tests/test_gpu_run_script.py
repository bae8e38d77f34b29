"""benchmarks/gpu_run.sh's plumbing, without a GPU: its ncu step run with stand-ins for the two things
that need one (kernel_profile.py's profiled runs, and ncu itself), so that a broken pipe, redirection
or file name in the script shows here rather than in a scarce GPU call. What the step computes from
ncu's CSV is tests/test_kernel_profile.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from test_kernel_profile import ROWS, UNITS, _csv

ROOT = Path(__file__).resolve().parents[1]
CHOICE = "triton autotune: fwd Cout=256 Cin=256 M<=131072 x=cl out=cl float16: BLOCK_M=128 num_warps=8"
PLAN = {"device": "stand-in", "dtype": "fp16", "layout": "channels_last",
        "regions": [{"label": "P2 triton", "kernels": ["_lateral_fwd_kernel"]},
                    {"label": "P2 cuda", "kernels": ["void fused_fpn::cuda::lateral_fwd_kernel<__half>(LateralFwdParams)",
                                                     "void at::native::vectorized_elementwise_kernel<4>(int)"]}]}


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_ncu_step_writes_the_summary_with_the_profiled_runs_triton_configs(tmp_path):
    csv = tmp_path / "raw.csv"
    csv.write_text(_csv(ROWS, UNITS))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    # python3 stand-in: kernel_profile.py's two GPU runs are faked (the plan run writes the plan; the
    # profiled run prints its autotuner choices on stderr, as the real one does); all else is python
    py = _script(tmp_path / "python", f"""#!/usr/bin/env bash
if [ "$1" = benchmarks/kernel_profile.py ] && [[ " $* " != *" --ncu-args "* ]] && [[ " $* " != *" --summarize "* ]]; then
    if [[ " $* " == *" --plan "* ]]; then
        args=("$@"); for i in "${{!args[@]}}"; do [ "${{args[$i]}}" = --plan ] && cp {plan} "${{args[$((i + 1))]}}"; done
        echo "P2 triton  1 kernels: _lateral_fwd_kernel"
    else
        echo "{CHOICE}" >&2; echo "profiled regions: P2 triton, P2 cuda" >&2
    fi
    exit 0
fi
exec {sys.executable} "$@"
""")
    # ncu stand-in: runs the application (its stdout dropped, stderr kept), then prints the raw CSV
    ncu = _script(tmp_path / "ncu", f"""#!/usr/bin/env bash
while [ $# -gt 0 ] && [ "$1" != {py} ]; do shift; done
"$@" > /dev/null || exit 1
cat {csv}
""")
    out = tmp_path / "out"
    env = dict(os.environ, GPU_RUN_STEPS="ncu", PYTHON=py, NCU=ncu, GPU_RUN_NCU_TIMEOUT="60")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "ncu: rc=0" in summary
    ncu_txt = (out / "ncu.txt").read_text()
    assert "P2 triton" in ncu_txt and "P2 cuda" in ncu_txt, ncu_txt
    assert ncu_txt.rstrip().endswith("Triton configs of the profiled run:\n" + CHOICE), ncu_txt
    assert CHOICE in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/ncu_plan.json", "logs/ncu_plan.txt", "logs/ncu_raw.csv", "logs/ncu.log", "logs/env.txt"} <= names
    assert not (out / "logs").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_tests_and_bench_steps_log_and_copy_their_results(tmp_path):
    """The tests step (one selected test: its log and JUnit XML) and the bench step (a quick CPU row:
    the result files it names are copied next to the summary), run on this machine's python."""
    out = tmp_path / "out"
    results = tmp_path / "results"
    env = dict(os.environ, GPU_RUN_STEPS="tests,bench", PYTHON=sys.executable,
               GPU_RUN_TEST_SELECT="test_host_cdiv_is_tritons", GPU_RUN_TEST_TIMEOUT="240",
               GPU_RUN_BENCH_BUDGET="120", GPU_RUN_BENCH_GRACE="30",
               GPU_RUN_BENCH_ARGS=(f"--quick --bench-device cpu --bench-cases lateral_P5 --bench-dtypes fp32 "
                                   f"--bench-layouts nchw --bench-providers eager,fused-torch "
                                   f"--bench-results-dir {results}"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "tests: rc=0" in summary and "bench: rc=0" in summary, summary
    assert "1 passed" in summary, summary            # the tests line: the selected test ran
    assert "tests that failed or errored (0, from the per-test lines):" in summary, summary
    assert "lateral_P5" in summary and "fused-torch" in summary
    copied = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".png", ".md"))
    assert copied == sorted(p.name for p in results.iterdir()) and len(copied) == 3, (copied, summary)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("logs/tests.log").read().decode()
        env_txt = tar.extractfile("logs/env.txt").read().decode()
    assert {"logs/tests.log", "logs/tests.xml", "logs/tests_failed.txt", "logs/bench.log", "logs/env.txt"} <= names
    assert "test_host_cdiv_is_tritons PASSED" in log, log[-2000:]   # -v: the test's own line, as it ended
    assert "before bench" in env_txt and "load average" in env_txt, env_txt[-2000:]   # what ran beside
