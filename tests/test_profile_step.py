"""benchmarks/profile_step.py's parsing and categorizing, on small synthetic traces (no profiling)."""

import pytest

from benchmarks import profile_step

HLO = """
HloModule jit__train_step

%fused_computation.2 (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0} parameter(0)
  ROOT %multiply.1 = f32[8]{0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(f)/optimizer/mul"}
}

ENTRY %main {
  %p = f32[8]{0} parameter(0)
  %loop_multiply_fusion.2 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/optimizer/cond/mul" id=3}
  %custom-call.3 = (f32[8]{0}, f32[]) custom-call(%p), metadata={op_name="jit(f)/transpose(jvp(lm_head_loss))/tkc"}
  %loop_transpose_fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/jvp(attention)/transpose"}
  ROOT %gemm_fusion_dot.3 = f32[8]{0} fusion(%p), metadata={op_name="jit(f)/jvp(lm_head_loss)/dot_general"}
}
"""


def _metadata(pid, tid, process, thread):
  return [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}},
          {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}]


def _gpu_trace():
  """Two steps of kernels on one GPU stream, a derived "XLA Ops" line that repeats one and a host event."""
  kernels = [  # (name, duration us, args)
      ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", 100, {}),
      ("_attention_fwd_kernel", 50, {}),
      ("_fwd_kernel", 20, {"hlo_op": "custom-call.3"}),  # the cross-entropy's, by its scope
      ("_bwd_kernel", 10, {}),  # no scope: RMSNorm's
      ("loop_multiply_fusion_2", 8, {"hlo_op": "command_buffer.1"}),  # joined on its kernel name: the optimizer
      ("input_reduce_fusion", 6, {}),
      ("loop_transpose_fusion_1", 4, {}),  # under the attention scope
      ("loop_convert_fusion", 2, {}),
      ("MemcpyD2D", 1, {}),
      ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 3, {}),
      ("gemm_fusion_dot_3", 30, {}),  # a matmul, though under the loss scope
      ("loop_add_fusion", 5, {"tf_op": "jit(_train_step)/transpose(jvp(rms_norm))/add"}),  # path from the event
  ]
  events = (_metadata(1, 1, "/host:CPU", "python") + _metadata(2, 10, "/device:GPU:0", "Stream #13(Compute)")
            + _metadata(2, 11, "/device:GPU:0", "XLA Ops"))
  ts = 0.0
  for _ in range(2):
    for name, dur, args in kernels:
      events.append({"ph": "X", "pid": 2, "tid": 10, "ts": ts, "dur": dur, "name": name, "args": args})
      ts += dur
    ts += 40  # a host gap between steps
  events.append({"ph": "X", "pid": 2, "tid": 11, "ts": 0.0, "dur": 100, "name": "custom-call.3", "args": {}})
  events.append({"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 1000, "name": "train_step", "args": {}})
  return {"traceEvents": events}


def test_op_paths_by_instruction_and_kernel_name():
  paths = profile_step.op_paths(HLO)
  assert paths["loop_multiply_fusion.2"] == paths["loop_multiply_fusion_2"] == "jit(f)/optimizer/cond/mul"
  assert paths["custom_call_3"] == "jit(f)/transpose(jvp(lm_head_loss))/tkc"
  assert paths["multiply.1"] == "jit(f)/optimizer/mul"
  assert "p" not in paths and "param_0.1" not in paths  # no metadata


def test_gpu_breakdown_by_category():
  result = profile_step.breakdown(_gpu_trace(), profile_step.op_paths(HLO), steps=2, step_ms=0.3)
  expected_us = {"matmuls": 130, "attention": 54, "loss": 20, "rms_norm": 15, "optimizer": 8, "reductions": 6,
                 "elementwise": 2, "copies": 1, "collectives": 3, "other": 0}
  assert result["categories_ms"] == pytest.approx({c: us / 1e3 for c, us in expected_us.items()})
  # Only the stream line counts: 239 us of kernels per step, back to back, in a 300 us step.
  assert result["kernel_ms"] == pytest.approx(0.239)
  assert result["device_busy_ms"] == pytest.approx(0.239)
  assert result["host_gaps_ms"] == pytest.approx(0.061)
  assert result["idle_before_ms"] == pytest.approx({"matmuls": 0.02})  # the 40 us between steps, before a matmul
  assert result["idle_before_kernel"] == {"nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT": pytest.approx(
      {"ms": 0.02, "stretches": 0.5})}  # one stretch in two steps
  assert result["op_path_source"] == pytest.approx({"event": 5 / 239, "program": 62 / 239, "none": 172 / 239})
  top = result["kernels"][0]
  assert (top["kernel"], top["category"], top["ms"], top["calls"]) == (
      "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "matmuls", pytest.approx(0.1), pytest.approx(1.0))


def test_cpu_thunks_count_innermost_and_overlap_once():
  """On a CPU: the thunks with an hlo_op, a conditional's not beside its body's; threads overlapping in time count
  once in the busy time."""
  events = _metadata(1, 1, "/host:CPU", "tf_XLAEigen") + _metadata(1, 2, "/host:CPU", "tf_XLAPjRtCpuClient")
  thunk = lambda tid, ts, dur, name: {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                                      "args": {"hlo_op": name, "hlo_module": "jit__train_step"}}
  events += [thunk(1, 0, 100, "cond.1"), thunk(1, 10, 30, "dot.4"), thunk(1, 50, 40, "reduce.7"),
             thunk(2, 20, 60, "copy.2"), {"ph": "X", "pid": 1, "tid": 1, "ts": 95, "dur": 1, "name": "end: dot.4"}]
  result = profile_step.breakdown({"traceEvents": events}, {}, steps=1, step_ms=0.2)
  assert result["categories_ms"]["matmuls"] == pytest.approx(0.03)
  assert result["categories_ms"]["reductions"] == pytest.approx(0.04)
  assert result["categories_ms"]["copies"] == pytest.approx(0.06)
  assert result["categories_ms"]["other"] == 0.0  # the conditional encloses the others
  assert result["device_busy_ms"] == pytest.approx(0.08)  # 10-90 us


def test_gpu_trace_without_stream_lines_fails_loudly():
  trace = {"traceEvents": _metadata(2, 11, "/device:GPU:0", "XLA Ops")}
  with pytest.raises(ValueError, match="no stream line"):
    profile_step.device_events(trace)


def test_shape_defaults_and_long_rows():
  args = profile_step.parse_args(["--tiny"])
  assert (args.rows, args.encoder_length, args.decoder_length, args.remat) == (16, 128, 64, "none")
  assert not args.unpacked
  args = profile_step.parse_args(["--rows", "8", "--encoder-length", "8192", "--remat", "block", "--unpacked"])
  assert (args.rows, args.encoder_length, args.decoder_length, args.remat, args.unpacked) == (8, 8192, 512, "block",
                                                                                              True)


def test_kernel_ms_times_each_kernel_of_a_jitted_call():
  """On the CPU the kernels are XLA's thunks; every one that ran has a positive time, the longest first."""
  import jax
  import jax.numpy as jnp

  times = profile_step.kernel_ms(jax.jit(lambda x: jnp.sin(x @ x).sum()), (jnp.ones((256, 256)),), calls=2)
  assert times and all(ms > 0 for ms in times.values())
  assert list(times.values()) == sorted(times.values(), reverse=True)
