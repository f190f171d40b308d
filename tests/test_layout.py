"""The layering rules of ARCHITECTURE.md, checked on the source: no import cycles (function-level imports count),
kernels that know nothing of the model, and an XLA model that loads no GPU kernel code."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fat5_jax", "pallas_kernels", "configs", "benchmarks")
GPU_MODULES = ("jax.experimental.pallas.triton", "triton", "jax_triton")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
  """Every project module -> the project modules it imports anywhere in its body (`from a import b` counts as
  a.b when that is a module, else a)."""
  files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
  graph = {}
  for name, path in files.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
    graph[name] = {t for t in targets if t in files and t != name}
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state and (found := visit(target)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycles():
  assert _cycle(_import_graph()) is None


def test_kernels_import_nothing_of_the_model():
  graph = _import_graph()
  offenders = {m: sorted(t for t in targets if t.startswith("fat5_jax"))
               for m, targets in graph.items() if m.startswith("pallas_kernels")}
  assert not any(offenders.values()), offenders


def _loaded_gpu_modules(code: str) -> list[str]:
  """The GPU-only modules (and fat5_jax) that running `code` in a fresh interpreter loads."""
  code += f"\nimport sys\nprint('loaded:', *sorted(m for m in {GPU_MODULES + ('fat5_jax',)!r} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1].split()[1:]


def test_kernel_packages_load_their_backends_only_when_used():
  """Each op's package and its reference import neither Pallas' Triton lowering, Triton nor jax-triton."""
  ops = ("attention", "cross_entropy", "rms_norm")
  assert _loaded_gpu_modules("\n".join(f"import pallas_kernels.{op}, pallas_kernels.{op}.reference"
                                       for op in ops)) == []


def test_an_xla_model_loads_no_gpu_kernel_code():
  code = """
from flax import nnx
import jax.numpy as jnp
from fat5_jax.config import model_config
from fat5_jax.model import T5
import fat5_jax.train
config = model_config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1, num_decoder_layers=1,
                      attention_impl="xla", kernel_backend="xla")
ids = jnp.ones((1, 8), jnp.int32)
T5(config, rngs=nnx.Rngs(0))(ids, ids).block_until_ready()
"""
  assert _loaded_gpu_modules(code) == ["fat5_jax"]


def test_the_command_line_loads_no_fine_tuning_metric_library():
  """Pretraining needs none of them (and the GPU image lacks them): they load when fine-tuning computes a metric."""
  libraries = ("sklearn", "sacrebleu", "rouge_score")
  code = f"import main, sys\nprint('loaded:', *sorted(m for m in {libraries!r} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1].split()[1:] == []
