"""benchmarks/scaling.py: the collectives it reads from HLO text, and the tool end to end on 2 simulated CPU devices."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import scaling
from fat5_jax.train import local_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The forms a GPU's optimized HLO gives collectives: asynchronous starts and dones, a combined all-reduce.
HLO = """
ENTRY %main {
  %weight = bf16[256,512]{1,0} parameter(0)
  %rows = bf16[8,64,512]{2,1,0} parameter(1)
  %loss = f32[] parameter(2)
  %all-gather-start.1 = (bf16[256,512]{1,0}, bf16[512,512]{1,0}) all-gather-start(%weight), dimensions={0}
  %all-gather-done.1 = bf16[512,512]{1,0} all-gather-done(%all-gather-start.1)
  %all-gather.2 = bf16[16,64,512]{2,1,0} all-gather(%rows), dimensions={0}
  %reduce-scatter.3 = bf16[256,512]{1,0} reduce-scatter(%all-gather-done.1), dimensions={0}
  %all-reduce-start.4 = (f32[], bf16[512,512]{1,0}) all-reduce-start(%loss, %all-gather-done.1)
  ROOT %all-reduce-done.4 = (f32[], bf16[512,512]{1,0}) all-reduce-done(%all-reduce-start.4)
}
"""


def test_collectives_are_counted_once_with_their_whole_tensors_and_activation_gathers_found():
  found = scaling.collectives(HLO, parameter_sizes={512 * 512}, batch_dimensions={8, 16, 64, 512})
  whole = 512 * 512 * 2
  assert found["collectives"] == {"all-gather": {"count": 2, "bytes": whole + 16 * 64 * 512 * 2},
                                  "all-reduce": {"count": 1, "bytes": 4 + whole},
                                  "reduce-scatter": {"count": 1, "bytes": whole},
                                  "all-to-all": {"count": 0, "bytes": 0},
                                  "collective-permute": {"count": 0, "bytes": 0}}
  # The weight's gather has a dimension of 512 (the batch's length too) but a parameter's size: not an activation.
  assert found["activation_all_gathers"] == ["[16,64,512]"]


def test_tiny_run_on_two_simulated_devices(tmp_path):
  env = dict(os.environ, **local_job.simulated_cpu_devices(2))
  out = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--tiny", "--devices", "2", "--steps", "2",
                        "--out", str(tmp_path / "scaling.json"), "--plot", str(tmp_path / "scaling.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  with open(tmp_path / "scaling.json") as f:
    results = json.load(f)
  assert results["environment"]["command"].startswith("python -m benchmarks.scaling --tiny")
  runs = {(run["devices"], run["mesh"]): run for run in results["runs"]}
  assert sorted(runs) == [(1, "one device"), (2, "data"), (2, "fsdp")]  # one device, measured once, is the baseline
  one = runs[1, "one device"]["rows_per_s"]
  for run in runs.values():
    assert "error" not in run, run
    assert run["rows"] == 6 * run["devices"]
    assert run["efficiency"] == pytest.approx(run["rows_per_s"] / (run["devices"] * one))
    assert run["activation_all_gathers"] == []
  assert runs[2, "fsdp"]["fsdp_over_data"] == pytest.approx(runs[2, "fsdp"]["rows_per_s"] /
                                                            runs[2, "data"]["rows_per_s"])
  count = lambda mesh, kind: runs[mesh]["collectives"][kind]["count"]
  assert not any(count((1, "one device"), kind) for kind in scaling.COLLECTIVES)
  assert count((2, "data"), "all-reduce") and not count((2, "data"), "all-gather")  # gradients summed, weights whole
  assert count((2, "fsdp"), "all-gather")  # each weight gathered where it is used
  assert os.path.getsize(tmp_path / "scaling.png") > 10_000


@pytest.mark.parametrize("text", ["1,3", "0", "two"])
def test_device_counts_outside_the_host_are_refused_in_one_line(text):
  with pytest.raises(ValueError, match=r"^--devices=.*: comma-separated counts between 1 and the 2 devices here$"):
    scaling.device_counts(text, 2)
  assert scaling.device_counts("2", 2) == [1, 2] and scaling.device_counts(None, 4) == [1, 2, 4]


def test_multi_process_job_refuses_a_used_directory_before_running_anything(tmp_path):
  (tmp_path / "one_process").mkdir()  # an earlier run's workdir, which a new run would resume
  out = subprocess.run([sys.executable, "scripts/multi_process_job.py", "--dir", str(tmp_path), "--out",
                        str(tmp_path / "summary.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].endswith("is not empty: its workdirs would resume earlier runs; give a "
                                                      "new or empty one")
  assert sorted(os.listdir(tmp_path)) == ["one_process"]  # nothing written
