"""Where the train state and the batch live: the device mesh and shardings.

The batch axis is sharded over the mesh axis "data" of all devices, on every
host (config.train.distributed); parameters are replicated, except that with
config.train.model_parallelism > 1 a second axis "model" splits the
hypernetwork's output layer and its optimizer state (`state_shardings`).
Every process builds the same global batch and `jax.device_put` keeps its own
rows.
"""

import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import ml_collections
import numpy as np


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


# State leaves at least this wide are split over the mesh's "model" axis (last
# dimension): the hypernetwork's output layer, its Adam moments and spectral
# state, which grow with the hash grid (hidden_width x L * T * F).
MIN_SHARDED_WIDTH = 4096


def state_shardings(state, mesh: Mesh):
  """NamedSharding per state leaf: replicated, except leaves of width >=
  MIN_SHARDED_WIDTH (divisible by the "model" axis) split on their last
  dimension when the mesh has a "model" axis of size > 1."""
  model_size = dict(mesh.shape).get("model", 1)

  def sharding(leaf):
    shape = getattr(leaf, "shape", ())
    if (model_size > 1 and len(shape) >= 1 and shape[-1] >= MIN_SHARDED_WIDTH
        and shape[-1] % model_size == 0):
      return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), "model"))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding, state)


def place_state(state, mesh: Mesh):
  """Commits the train state to the mesh with `state_shardings`, as the train
  step returns it (an uncommitted input would compile the step a second time)."""
  return jax.device_put(state, state_shardings(state, mesh))


def jit_train_step(train_step, mesh: Mesh, state):
  """jit with the batch sharded over the mesh's "data" axis and the state laid
  out by `state_shardings` (`state` gives the shapes); the state is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = state_shardings(state, mesh)
  return jax.jit(train_step, in_shardings=(shardings, data_sharding(mesh), replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for config.train.distributed, before
  anything touches a device. On TPU pods, SLURM, Open MPI and Kubernetes JAX
  finds the coordinator and this process's id itself; elsewhere (several
  processes on one machine, say) set JAX_COORDINATOR_ADDRESS=host:port,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment."""
  num_processes, process_id = (os.environ.get(name) for name in ("JAX_NUM_PROCESSES",
                                                                 "JAX_PROCESS_ID"))
  jax.distributed.initialize(num_processes=int(num_processes) if num_processes else None,
                             process_id=int(process_id) if process_id else None)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The device mesh over every device of every process: axis "data" (the
  batch's prompt rows), and with config.train.model_parallelism = m > 1 a
  second axis "model" of size m over which the hypernetwork's output layer is
  split (see `state_shardings`)."""
  devices = np.asarray(jax.devices())
  model_size = config.train.model_parallelism
  if model_size < 1 or len(devices) % model_size:
    raise ValueError(f"train.model_parallelism={model_size} must divide the "
                     f"{len(devices)} devices")
  data_size = len(devices) // model_size
  if config.batch.prompts_per_step % data_size:
    raise ValueError(f"batch.prompts_per_step={config.batch.prompts_per_step} must be a "
                     f"multiple of the {data_size} devices the batch is sharded over")
  if model_size == 1:
    return Mesh(devices, ("data",))
  return Mesh(devices.reshape(data_size, model_size), ("data", "model"))
