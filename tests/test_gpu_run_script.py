"""benchmarks/gpu_run.sh's plumbing, without a GPU: its ncu step run with stand-ins for the two things
that need one (kernel_profile.py's profiled runs, and ncu itself), its sanitize step with a stand-in
for compute-sanitizer and tests/gpu_sanitizer_cases.py's cases on CPU tensors, so that a broken pipe,
redirection or file name in the script shows here rather than in a scarce GPU call. What the step computes from
ncu's CSV is tests/test_kernel_profile.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

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


SANITIZER_STAND_IN = """#!/usr/bin/env bash
echo "$* NO_CACHING=$PYTORCH_NO_CUDA_MEMORY_CACHING" >> {calls}
tool=memcheck
while [ $# -gt 0 ] && [ "$1" != {python} ]; do
    if [ "$1" = --tool ]; then tool=$2; fi
    shift
done
"$@"
if [ "$tool" = racecheck ] && [ "${{STAND_IN_RACE:-}}" = 1 ]; then
    echo "========= Error: Race reported between Write access at lateral_fwd_kernel and Read access"
    echo "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    exit 86
fi
echo "========= ERROR SUMMARY: 0 errors"
"""


def _sanitize_step(tmp_path, python=sys.executable, **env_vars):
    """gpu_run.sh's sanitize step with the compute-sanitizer stand-in (racecheck reports a hazard with
    STAND_IN_RACE=1), the cases on this CPU's cpu backend."""
    calls = tmp_path / "calls.txt"
    sanitizer = _script(tmp_path / "compute-sanitizer", SANITIZER_STAND_IN.format(calls=calls, python=python))
    out = tmp_path / "out"
    env = dict(os.environ, GPU_RUN_STEPS="sanitize", PYTHON=python, COMPUTE_SANITIZER=sanitizer,
               GPU_RUN_SANITIZE_ARGS="--device cpu --backends cpu", GPU_RUN_SANITIZE_SHARDS="3", **env_vars)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line.strip() for line in (out / "sanitize.txt").read_text().splitlines()]
    tools = calls.read_text().splitlines() if calls.exists() else []
    return proc, (out / "summary.txt").read_text(), lines, tools, out


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_sanitize_step_runs_the_cases_plainly_then_under_each_tool(tmp_path):
    """The sanitize step with a compute-sanitizer stand-in (it runs the application, then prints the
    tool's summary line; racecheck reports a hazard and exits with the error exit code), the cases on
    this CPU: the plain run in shards, then one run per tool; each run's counts, rc and summary line reach
    sanitize.txt and the summary, the runs see PYTORCH_NO_CUDA_MEMORY_CACHING=1 and the tool's flags
    (racecheck and synccheck only our kernels), and the failed run fails the step."""
    proc, summary, lines, tools, out = _sanitize_step(tmp_path, GPU_RUN_SANITIZE_TIMEOUT="120", STAND_IN_RACE="1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]   # racecheck's hazard fails the run
    assert "sanitize: rc=1" in summary, summary
    runs = [line for line in lines if line.startswith(("plain (", "memcheck (", "racecheck (", "synccheck ("))]
    assert runs[0].startswith("plain (cpu): ran ") and runs[0].endswith(", 0 failed, 3 of 3 processes finished")
    count = int(runs[0].split("ran ")[1].split(" cases")[0])
    assert count > 50, runs
    # (labelled with the backends each run reports: GPU_RUN_SANITIZE_ARGS's cpu)
    assert runs[1:] == [f"memcheck (cpu): rc=0, ran {count} cases, 0 failed, ERROR SUMMARY: 0 errors",
                        f"racecheck (cpu): rc=86, ran {count} cases, 0 failed, "
                        f"RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)",
                        f"synccheck (cpu): rc=0, ran {count} cases, 0 failed, ERROR SUMMARY: 0 errors"], lines
    assert "RACECHECK SUMMARY" in summary and "from logs/sanitize_racecheck.log:" in lines
    assert len(tools) == 3 and all(t.endswith("NO_CACHING=1") for t in tools), tools
    common = ("--error-exitcode 86 --print-limit 20 --report-api-errors no --check-exit-code no "
              "--target-processes application-only --destroy-on-device-error kernel ")
    for tool, line in zip(("memcheck", "racecheck", "synccheck"), tools):
        ours = "--kernel-name kns=fused_fpn " if tool != "memcheck" else ""
        assert line.startswith(f"--tool {tool} {common}{ours}{sys.executable} "), line
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/sanitize_{n}.log" for n in ("plain_0", "plain_2", "memcheck", "racecheck", "synccheck")} <= names


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_sanitize_step_stops_at_its_budget(tmp_path):
    """A step budget too small for the plain run: its processes get 1 s (a process that misses the
    SIGINT, as one importing torch now and then does, is killed 10 s later, by which time a CPU run may
    have finished), no tool runs (NOT-RUN), and the step fails."""
    proc, summary, lines, tools, _ = _sanitize_step(tmp_path, GPU_RUN_SANITIZE_BUDGET="1")
    assert proc.returncode == 1 and "sanitize: rc=1" in summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(line.startswith("plain (") and line.endswith(" of 3 processes finished") for line in lines), lines
    assert [line for line in lines if "NOT-RUN" in line] == [
        f"{tool} ({backends}): NOT-RUN, GPU_RUN_SANITIZE_BUDGET used up"
        for tool, backends in (("memcheck", "cuda,triton"), ("racecheck", "cuda"), ("synccheck", "cuda"))]
    assert tools == []


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_sanitize_step_fails_when_a_plain_shard_fails(tmp_path):
    """One of the plain run's processes fails (a stand-in python for shard 1/3) while every tool run
    passes: the step fails, and sanitize.txt counts the failure and shows that shard's lines."""
    python = _script(tmp_path / "python", f"""#!/usr/bin/env bash
if [[ " $* " == *" --shard 1/3 "* ]]; then
    echo "backends: cpu on cpu"; echo "case cpu float32 nchw stand-in"; echo "FAILED cpu float32 nchw stand-in: boom"
    echo "ran 1 cases, 1 failed"; exit 1
fi
exec {sys.executable} "$@"
""")
    proc, summary, lines, tools, _ = _sanitize_step(tmp_path, python=python)
    assert proc.returncode == 1 and "sanitize: rc=1" in summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    plain = next(line for line in lines if line.startswith("plain ("))
    assert plain.endswith(" 1 failed, 3 of 3 processes finished"), lines
    assert "from logs/sanitize_plain_1.log:" in lines and "FAILED cpu float32 nchw stand-in: boom" in lines
    assert [line.split(":")[1].split(",")[0] for line in lines if line.startswith(("memcheck", "racecheck", "synccheck"))] \
        == [" rc=0"] * 3, lines


def test_sanitizer_cases_check_the_values_they_run(monkeypatch, capsys):
    """tests/gpu_sanitizer_cases.py on this CPU: every case passes, and a backend that drops its bias in
    one layout fails those cases, and the run goes on and fails at its end (the cases check values, not
    only that the kernels ran)."""
    import gpu_sanitizer_cases
    import fused_fpn

    assert gpu_sanitizer_cases.main(["--device", "cpu", "--backends", "cpu,torch"]) == 0
    real = fused_fpn.lateral

    def drops_bias_in_channels_last(x, weight, bias=None, top=None, *, backend="auto"):
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return real(x, weight, None if cl else bias, top, backend=backend)
    monkeypatch.setattr(fused_fpn, "lateral", drops_bias_in_channels_last)
    capsys.readouterr()
    assert gpu_sanitizer_cases.main(["--device", "cpu", "--backends", "cpu"]) == 1
    printed = capsys.readouterr().out.splitlines()
    failed = [line for line in printed if line.startswith("FAILED ")]
    assert failed and all((" channels_last " in line or " one_element_off " in line) and "bias+top" in line
                          for line in failed), failed   # one_element_off: channels_last too
    ran = int(printed[-1].split()[1])
    assert printed[-1] == f"ran {ran} cases, {len(failed)} failed" and ran > len(failed)   # it went on


def test_sanitizer_cases_shard_into_a_partition_with_the_same_inputs(monkeypatch, capsys):
    """``--shard K/S`` runs every case exactly once across the S shards, each with the inputs (the
    generator's seed) it has in a run of all of them."""
    import gpu_sanitizer_cases

    seeds = {}

    def record(case, backend, device, gen):
        seeds.setdefault(case.describe(backend), []).append(gen.initial_seed())
    monkeypatch.setattr(gpu_sanitizer_cases, "run_case", lambda case, backend, device, gen: record(case, backend, device, gen))
    monkeypatch.setattr(gpu_sanitizer_cases, "run_grad_case", lambda case, device, gen: record(case, "cpu", device, gen))
    assert gpu_sanitizer_cases.main(["--device", "cpu", "--backends", "cpu,torch"]) == 0
    whole = {k: v[0] for k, v in seeds.items()}
    assert len(whole) > 150 and all(len(v) == 1 for v in seeds.values())
    seeds.clear()
    for k in range(3):
        assert gpu_sanitizer_cases.main(["--device", "cpu", "--backends", "cpu,torch", "--shard", f"{k}/3"]) == 0
    assert all(len(v) == 1 for v in seeds.values()) and {k: v[0] for k, v in seeds.items()} == whole


def test_sanitizer_cases_stop_at_a_cuda_error(monkeypatch, capsys):
    """A case failing with a CUDA error (the context is then unusable) ends the run there: the cases after
    it are not started, and the run fails."""
    import gpu_sanitizer_cases

    calls = []

    def third_faults(case, backend, device, gen):
        calls.append(case)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gpu_sanitizer_cases, "run_case", third_faults)
    assert gpu_sanitizer_cases.main(["--device", "cpu", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(calls) == 3 and out[-2:] == ["a CUDA error: the context is unusable, stopping", "ran 3 cases, 1 failed"]
    assert sum(line.startswith("case ") for line in out) == 3 and out[-3].startswith("FAILED cpu ")


def test_sanitizer_cases_run_the_triton_backend_under_the_interpreter():
    """The Triton rows of tests/gpu_sanitizer_cases.py (fp16 on a CPU: TF32 needs a GPU), forward and
    backward, under TRITON_INTERPRET=1 in a fresh process (triton reads it at import)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_sanitizer_cases.py"), "--device", "cpu",
                           "--backends", "triton"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran 28 cases, 0 failed" in proc.stdout and "triton float16 noncontig" in proc.stdout, proc.stdout[-2000:]
