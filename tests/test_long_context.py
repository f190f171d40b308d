"""benchmarks/long_context.py end to end on tiny_fr shapes (no FAT5 checkout), and its table's join with FAT5's runs."""

import json
import os
import subprocess
import sys

from benchmarks import common, long_context


def test_tiny_runs_each_length_in_its_own_process(tmp_path):
  out = tmp_path / "long_context.json"
  subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--tiny", "--out", str(out), "--plot",
                  str(tmp_path / "long_context.png")], cwd=common.CHECKOUT, check=True, timeout=300)
  results = json.loads(out.read_text())
  assert "fat5" not in results and results["tokens_per_batch"] == 1024
  assert [(r["encoder_length"], r["rows"], r["decoder_length"]) for r in results["results"]] == [(128, 8, 64),
                                                                                               (256, 4, 64)]
  for run in results["results"]:
    assert "error" not in run and "vs_fat5" not in run
    assert run["rows_per_s"] > 0 and run["encoder_tokens_per_s"] == run["rows_per_s"] * run["encoder_length"]
    assert run["peak_memory_gib"] >= 0 and run["compiled_total_gib"] > run["compiled_temp_gib"] > 0
    assert 0 < run["dispatch_s"] <= run["step_s"] and run["step_s_pipelined"] > 0
    assert run["compile_s"] > 0 and run["warmup_s"] > 0
    assert run["mfu"] is run["mfu_pipelined"] is None  # a CPU has no peak to divide by
  assert os.path.getsize(tmp_path / "long_context.png") > 0


def test_table_puts_fat5_beside_ours_or_says_how_it_failed():
  results = {"fat5": [{"encoder_length": 1024, "rows_per_s": 200.0, "mfu": 0.2, "peak_memory_gib": 40.0},
                      {"encoder_length": 8192, "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate"}],
             "results": [{"encoder_length": 1024, "rows_per_s": 300.0, "vs_fat5": 1.5},
                         {"encoder_length": 8192, "rows_per_s": 30.0},
                         {"encoder_length": 16384, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"}]}
  rows = long_context.table_rows(results)
  assert [(r["fat5_rows_per_s"], r["fat5_mfu"], r["error"]) for r in rows] == [
      (200.0, 0.2, ""), ("OutOfMemoryError: CUDA out of memory. Tr", "", ""),
      ("", "", "XlaRuntimeError: RESOURCE_EXHAUSTED: Out")]
