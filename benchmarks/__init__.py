"""The fused_fpn benchmark suite (``pytest benchmarks``); a package so that ``benchmarks.harness``
is importable from the tests. Not installed with fused_fpn."""
