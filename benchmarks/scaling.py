"""How the small_fr training step scales over the GPUs of one host, data-parallel and FSDP.

For N in `--devices` (default 1, 2, 4, ... up to the host's device count) and each mesh in `--meshes`, the step of
`train_step.measure` runs on the first N devices with `--rows-per-device` x N rows of 512 + 512 tokens, meshed
data=N (parameters replicated, gradients all-reduced) or fsdp=N (parameters split, each gathered where it is used,
gradients reduce-scattered); N = 1 is one run, the baseline of both. Each run is a subprocess of its own, so that
its devices' memory peaks are its own. Reported per run:
  - rows/s, step time, rows/s per device; `efficiency`, rows/s over N x the one-device rows/s; `fsdp_over_data`,
    FSDP's rows/s over data-parallel's at the same N;
  - `peak_memory_gib`, the peak of the fullest device;
  - `collectives`: count and bytes (its whole tensors, on one device) of each kind of collective in the compiled
    step, each op of the program counted once; and `activation_all_gathers`, the result shapes of the all-gathers that
    gather activations rather than parameters (a dimension of rows or tokens, and not a parameter's size): expected
    empty, since every device computes on its own rows (docs/training.md, "The mesh").

  python -m benchmarks.scaling --devices 1,2 --out OUT/scaling.json --plot OUT/scaling.png   # 2 GPUs: ~4 min
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    python -m benchmarks.scaling --tiny --devices 1,2,4 --out /tmp/scaling.json --plot /tmp/scaling.png  # ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import jax

from benchmarks import common, train_step
from configs import small_fr

MESHES = ("data", "fsdp")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# An instruction of the optimized HLO: `%name = RESULT op(%operand, ...), attributes`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.-]+) = (?P<result>.*?) (?P<op>[\w-]+)\((?P<operands>[^)]*)\)",
                          re.MULTILINE)
_SHAPE = re.compile(r"\b([a-z]+)(\d*)[a-z0-9]*\[([\d,]*)\]")
# --tiny: tiny_fr with one layer each (common.tiny_config) at profile_step.py --tiny's lengths; 6 rows a device, a
# number that no tiny_fr dimension equals.
TINY_LENGTHS, TINY_ROWS_PER_DEVICE = (128, 64), 6


def shapes(text: str) -> list[tuple[int, tuple[int, ...]]]:
  """(bytes per element, dimensions) of each array shape in HLO text such as `(bf16[8,512]{1,0}, f32[])`."""
  found = []
  for kind, bits, dims in _SHAPE.findall(text):
    element_bytes = 1 if kind == "pred" else max(1, int(bits or 8) // 8)
    found.append((element_bytes, tuple(int(d) for d in dims.split(",") if d)))
  return found


def collectives(hlo: str, *, parameter_sizes: set[int], batch_dimensions: set[int]) -> dict:
  """Count and bytes of each kind of collective in the optimized HLO text, and the result shapes of the all-gathers of
  activations: a result with one of `batch_dimensions` (rows, tokens, lengths) that is not the size of a parameter
  (under FSDP each weight is gathered whole). The bytes of a collective are those of its whole tensors, the larger
  of its operands and results (an all-gather's results, a reduce-scatter's operands)."""
  instructions = list(_INSTRUCTION.finditer(hlo))
  result_shapes = {instruction["name"]: shapes(instruction["result"]) for instruction in instructions}
  found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  activation_gathers = []
  for instruction in instructions:
    kind = instruction["op"].removesuffix("-start")  # an asynchronous collective counts once, at its start
    if kind not in COLLECTIVES:
      continue
    operands = [shape for name in re.findall(r"%([\w.-]+)", instruction["operands"]) for shape in result_shapes[name]]
    # An asynchronous start's result is (operands..., results..., context...), all-reduce-start's excepted (its
    # results only, the operands' sizes).
    results = shapes(instruction["result"])
    results = results[len(operands):2 * len(operands)] if instruction["op"].endswith("-start") else results
    found[kind]["count"] += 1
    found[kind]["bytes"] += max(sum(element_bytes * math.prod(dims) for element_bytes, dims in tensors)
                                for tensors in (operands, results))
    if kind == "all-gather":
      activation_gathers += [f"[{','.join(map(str, dims))}]" for _, dims in results
                             if math.prod(dims) not in parameter_sizes and batch_dimensions & set(dims)]
  return {"collectives": found, "activation_all_gathers": activation_gathers}


def run_one(devices: int, mesh: str, args) -> dict:
  """The step on the first `devices` devices, meshed `mesh` (data, fsdp, or for one device "one device"):
  train_step.measure's result, with the collectives of the compiled step."""
  values = common.tiny_config() if args.tiny else small_fr.get_config()
  data, fsdp = (1, devices) if mesh == "fsdp" else (devices, 1)
  values.train.update(mesh_data=data, mesh_fsdp=fsdp)
  encoder_length, decoder_length = TINY_LENGTHS if args.tiny else (512, 512)
  rows_each = args.rows_per_device
  rows = rows_each * devices
  batch_dimensions = {rows_each, rows, encoder_length, decoder_length, rows_each * encoder_length,
                      rows_each * decoder_length, rows * encoder_length, rows * decoder_length}

  def inspect(compiled) -> dict:
    params = compiled.args_info[0][0]["params"]  # the step's arguments: (state, batch)
    return collectives(compiled.as_text(), parameter_sizes={math.prod(p.shape) for p in jax.tree.leaves(params)},
                       batch_dimensions=batch_dimensions)

  result = train_step.measure(values.model.attention_impl, values.model.kernel_backend, rows=rows, accum=1,
                              steps=args.steps, values=values, encoder_length=encoder_length,
                              decoder_length=decoder_length, devices=jax.devices()[:devices], inspect=inspect)
  return {"devices": devices, "mesh": mesh, "mesh_data": data, "mesh_fsdp": fsdp, **result,
          "rows_per_s_per_device": result["rows_per_s"] / devices}


def measured_in_subprocess(devices: int, mesh: str, args, environment: dict) -> dict:
  """run_one in a fresh process (its own memory peaks); a failure (e.g. out of memory) is recorded, not raised."""
  command = [sys.executable, "-m", "benchmarks.scaling", "--one", f"{devices},{mesh}", "--steps", str(args.steps),
             "--rows-per-device", str(args.rows_per_device), *(["--tiny"] if args.tiny else [])]
  return {"devices": devices, "mesh": mesh, **common.json_line_of(command, cwd=common.CHECKOUT, env=environment)}


def with_ratios(runs: list[dict]) -> list[dict]:
  """The runs with `efficiency` against the one-device run and `fsdp_over_data` at each device count."""
  measured = [run for run in runs if "error" not in run]
  one = next((run["rows_per_s"] for run in measured if run["devices"] == 1), None)
  data = {run["devices"]: run["rows_per_s"] for run in measured if run["mesh"] in ("data", "one device")}
  out = []
  for run in runs:
    if "error" not in run:
      run = {**run, "efficiency": run["rows_per_s"] / (run["devices"] * one) if one else None}
      if run["mesh"] == "fsdp" and run["devices"] in data:
        run["fsdp_over_data"] = run["rows_per_s"] / data[run["devices"]]
    out.append(run)
  return out


def plot(results: dict, path: str):
  """Rows/s against the number of devices for each mesh, with ideal scaling from one device, labelled with the
  efficiency."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [run for run in results["runs"] if "error" not in run]
  one = [run for run in runs if run["devices"] == 1]
  counts = sorted({run["devices"] for run in runs})
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  if one:
    ax.plot(counts, [n * one[0]["rows_per_s"] for n in counts], "k--", linewidth=1, label="ideal (N x one device)")
  for mesh, marker in zip(MESHES, ("o", "s")):
    points = sorted((run["devices"], run["rows_per_s"], run["efficiency"]) for run in runs
                    if run["mesh"] in (mesh, "one device"))
    if len(points) < 2:
      continue
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=f"{mesh}=N")
    for devices, rows_per_s, efficiency in points[1:]:
      if efficiency is None:  # the one-device baseline failed
        continue
      ax.annotate(f"{efficiency:.0%}", (devices, rows_per_s), textcoords="offset points", xytext=(6, -10 if
                  mesh == "fsdp" else 4), fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_xticks(counts, [str(n) for n in counts])
  ax.set_xlabel(f"devices ({results['environment']['device']})")
  ax.set_ylabel("training rows/s")
  ax.set_title(f"{results['config']}: {results['rows_per_device']} rows of {results['encoder_length']} + "
               f"{results['decoder_length']} tokens per device", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


def device_counts(text: str | None, available: int) -> list[int]:
  """`--devices` (default: 1, 2, 4, ... up to `available`), always with 1, the baseline."""
  if text is None:
    return [2 ** k for k in range(available.bit_length()) if 2 ** k <= available]
  try:
    counts = sorted({1, *(int(n) for n in text.split(","))})
  except ValueError:
    counts = [0]
  if counts[0] < 1 or counts[-1] > available:
    raise ValueError(f"--devices={text}: comma-separated counts between 1 and the {available} devices here")
  return counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", help="comma-separated device counts (default 1, 2, 4, ... up to all)")
  parser.add_argument("--meshes", default=",".join(MESHES), help="comma-separated meshes among data, fsdp")
  parser.add_argument("--rows-per-device", type=int, help=f"rows per device per step (default 128; "
                                                           f"{TINY_ROWS_PER_DEVICE} with --tiny)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps of each run")
  parser.add_argument("--tiny", action="store_true", help=f"tiny_fr with one layer each ({TINY_LENGTHS[0]} + "
                                                          f"{TINY_LENGTHS[1]} tokens): checks the tool on a CPU's "
                                                          "simulated devices")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # "N,MESH": one run, its result as a JSON line
  args = common.parse_args(parser, "scaling", plot)
  if args is None:
    return
  args.rows_per_device = args.rows_per_device or (TINY_ROWS_PER_DEVICE if args.tiny else 128)
  if args.one:
    devices, mesh = args.one.split(",")
    print(json.dumps(run_one(int(devices), mesh, args)))
    return
  meshes = args.meshes.split(",")
  if set(meshes) - set(MESHES):
    parser.error(f"--meshes={args.meshes}: choose among {', '.join(MESHES)}")
  environment = common.subprocess_environment()  # before this process counts the devices
  try:
    counts = device_counts(args.devices, jax.local_device_count())
  except ValueError as error:
    parser.error(str(error))
  encoder_length, decoder_length = TINY_LENGTHS if args.tiny else (512, 512)
  results = {"config": common.TINY_CONFIG_NAME if args.tiny else small_fr.__name__, "encoder_length": encoder_length,
             "decoder_length": decoder_length, "rows_per_device": args.rows_per_device, "runs": []}
  for devices in counts:
    for mesh in meshes if devices > 1 else ["one device"]:  # one device: one run, the baseline of both meshes
      run = measured_in_subprocess(devices, mesh, args, environment)
      print(json.dumps({k: v for k, v in run.items() if k != "collectives"}), flush=True)
      results["runs"] = with_ratios(results["runs"] + [run])
      common.write_results(args.out, results)  # after every run: a run cut short keeps what it measured
  table = [{**run, **{f"{kind}s": f"{c['count']} / {c['bytes'] / 2 ** 20:.1f} MiB"
                      for kind, c in run.get("collectives", {}).items() if c["count"]},
            "activation_all_gathers": len(run.get("activation_all_gathers", []))} for run in results["runs"]]
  common.print_table(table, ["devices", "mesh", "step_s", "rows_per_s", "rows_per_s_per_device", "efficiency",
                             "fsdp_over_data", "peak_memory_gib", "all-gathers", "all-reduces", "reduce-scatters",
                             "activation_all_gathers", "error"])
  plot({"environment": common.environment(), **results}, args.plot)


if __name__ == "__main__":
  main()
