"""Device mesh ("data", "fsdp") and parameter partition rules.

Batches are split over both axes (every device sees different rows). Parameters are replicated over "data" and,
when "fsdp" has more than one device, their largest evenly divisible dimension is split over "fsdp" (ZeRO-3 style:
XLA gathers them for each matmul and reduce-scatters their gradients).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fat5_jax.config import ConfigError, TrainConfig

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2 ** 14  # smaller tensors (norm scales, bias tables) are cheaper replicated


def make_mesh(config: TrainConfig, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  fsdp = config.mesh_fsdp
  data = len(devices) // fsdp if config.mesh_data == -1 else config.mesh_data
  if data * fsdp != len(devices):
    hint = (f"train.mesh_fsdp must divide the {len(devices)} devices" if config.mesh_data == -1 else
            "set train.mesh_data=-1 to use all that fsdp leaves")
    raise ConfigError(f"mesh data={config.mesh_data} x fsdp={config.mesh_fsdp} does not cover the {len(devices)} "
                      f"devices: {hint}")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def parameter_spec(shape, fsdp_size: int) -> P:
  """Splits the largest dimension divisible by the fsdp axis; small or indivisible tensors stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def parameter_shardings(abstract_params, mesh: Mesh):
  """Shardings of a pytree of parameters, or of anything shaped like them (optimizer moments)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, parameter_spec(x.shape, fsdp)), abstract_params)


def batch_sharding(mesh: Mesh, *, leading_axes: int = 0) -> NamedSharding:
  """Rows split over every device; `leading_axes` unsplit dimensions first (e.g. the micro-batch axis)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
