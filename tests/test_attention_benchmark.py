"""benchmarks/attention.py's cross-attention rows (--query-len) on a CPU: shapes and FLOP count, and the refusal of
a causal cross-attention; benchmarks/attention_compile.py's run off a GPU (lowered for CUDA, not compiled)."""

import subprocess
import sys

import jax
import pytest

from benchmarks import attention, attention_compile, common


def test_cross_attention_rows_count_queries_times_keys(monkeypatch):
  monkeypatch.setattr(common, "time_ms", lambda fn, arg_sets, **_: {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0})
  rows = attention.bench_config(batch=2, heads=3, head_dim=64, seq_len=256, causal=False, names=["xla_t5"],
                                q_len=64)
  assert [(r["method"], r["q_len"], r["seq_len"]) for r in rows] == [("xla_t5", 64, 256)]
  assert rows[0]["fwd_tflops"] == pytest.approx(4 * 2 * 64 * 256 * 3 * 64 / 2.0 / 1e9)
  assert rows[0]["fwd_bwd_tflops"] == pytest.approx(3.5 * rows[0]["fwd_tflops"])


def test_inputs_give_queries_and_their_cotangent_the_query_length():
  inputs = attention.make_inputs(jax.random.PRNGKey(0), 2, 256, 3, 64, sets=1, q_len=64)[0]
  assert inputs["q"].shape == inputs["ct"].shape == (2, 64, 3, 64)
  assert inputs["k"].shape == inputs["v"].shape == (2, 256, 3, 64)


def test_causal_cross_attention_is_refused_in_one_line():
  run = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--query-len", "64", "--causal", "both"],
                       cwd=common.CHECKOUT, capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 2 and "add --causal no" in run.stderr.strip().splitlines()[-1]


def test_compile_benchmark_off_a_gpu_lowers_two_layers_to_one_copy_of_the_kernels():
  run = attention_compile.one_run(2, shared=True)
  assert run["mosaic_calls"] == 2 and run["compile_s"] is None and run["lower_s"] > 0
