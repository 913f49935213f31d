"""Data-parallel and multi-host training on ``jax.sharding``: mesh, shardings, batches.

One mesh axis, ``"data"``, spans every device of every process. Parameters,
optimizer state and BatchNorm statistics are replicated over it; each batch is
split along its first axis. A step is a plain ``jax.jit`` whose inputs carry
these shardings: XLA partitions it and inserts the gradient all-reduce, and
because ``jaxnets.layers.BatchNorm`` takes ``jnp.mean`` over the (global)
batch axis, the batch statistics are all-reduced too, which is
``SyncBatchNorm`` with no extra code. ``tests/test_distributed.py`` checks both
against a single device on the same global batch. There is no ``pmap``.

Multi-host: every process runs the same program on its own slice of each
global batch (``train.data.Loader(process_index=..., process_count=...)``
hands out exactly that slice) and ``global_batch`` assembles the slices into
one global array with ``jax.make_array_from_process_local_data``.

Failure of a peer: a collective with a dead peer fails at once on CPU (Gloo:
``Connection closed by peer``) and the JAX coordination service terminates
the survivors after ``heartbeat_timeout_s`` without heartbeats ("the JAX
distributed service detected fatal errors ... another task died"), so a lost
host ends the job within a bounded time instead of hanging it.

Launching
---------

One machine, any number of local accelerators (GPUs, a single TPU VM host):
nothing to do; ``initialize()`` is a no-op and the mesh covers the local
devices::

    python -m train.finetune --arch resnet50 --dataset tfds:imagenette ...

Cloud TPU VM pod slice (e.g. ``v4-32``: 4 hosts): copy the repository to every
worker and start the same command on all of them at once; ``initialize()``
detects the TPU VM and lets JAX find the coordinator, process count and index
from the TPU metadata::

    gcloud compute tpus tpu-vm scp --recurse jaxnets NAME: --zone ZONE --worker=all
    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
        --command="cd jaxnets && python -m train.finetune --arch resnet50 ..."

``--batch-size`` is the global batch; it must be divisible by the total
number of devices. Only process 0 prints and shows progress bars; every
process must reach each checkpoint save (orbax saves collectively).

GPU or CPU hosts without a cluster manager: start one process per host with
the coordinator's address (any free port on process 0's host)::

    python -m train.finetune ... --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 0      # on host 0
    python -m train.finetune ... --coordinator 10.0.0.1:1234 \\
        --num-processes 2 --process-id 1      # on host 1

On CPU the cross-process collectives use Gloo (JAX's default,
``jax_cpu_collectives_implementation="gloo"``).
"""

from __future__ import annotations

import glob
import importlib.util
import socket
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "initialize",
    "on_tpu_vm",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "global_batch",
    "replicate",
    "is_main_process",
    "print0",
    "progress",
    "configure_logging",
    "make_sharded_step",
    "make_predict_step",
]

DATA_AXIS = "data"

_T = TypeVar("_T")


def on_tpu_vm() -> bool:
    """Whether this is a Cloud TPU VM (libtpu installed and TPU chips attached).

    The same test JAX makes before asking the TPU metadata server for the pod
    slice's layout; it does not touch the JAX backend, so it is safe before
    ``jax.distributed.initialize``.

    Returns:
      True on a TPU VM host.
    """
    if importlib.util.find_spec("libtpu") is None:
        return False
    # TPU v2-v4 appear as /dev/accel*, v5 and later as VFIO devices.
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> bool:
    """Join a multi-process JAX job when there is one; a no-op otherwise.

    Call it first thing in a program, before anything touches a JAX device.

    Args:
      coordinator: ``host:port`` of process 0's coordination service. When
        given, ``num_processes`` and ``process_id`` are required.
      num_processes: total processes.
      process_id: this process's index in ``[0, num_processes)``.
      timeout_s: how long to wait for every process to join before failing.
      heartbeat_timeout_s: after this long without a heartbeat a process is
        considered dead and the others are terminated with an error naming it.

    Returns:
      True when ``jax.distributed`` was initialised (explicit coordinator, or
      a TPU VM where JAX auto-detects the pod slice); False on a single host
      with no coordinator.

    Raises:
      ValueError: for a coordinator without a process count and index, or an
        index out of range.
    """
    timeouts = dict(initialization_timeout=int(timeout_s),
                    heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        check_coordinator(coordinator, process_id)
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id,
                                   **timeouts)
        return True
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError("num_processes/process_id given without a coordinator address")
    if on_tpu_vm():
        # On a TPU VM JAX reads the pod slice's hosts from the metadata server;
        # on a single-host slice this makes a one-process job, which is harmless.
        jax.distributed.initialize(**timeouts)
        return True
    return False


def check_coordinator(address: str, process_id: int) -> None:
    """Checks a coordinator address before JAX is given it: JAX waits out its whole
    initialisation timeout on a host it cannot resolve or a malformed address, and
    process 0 fails with a traceback (or crashes) when its port is taken.

    Raises:
      ValueError: naming what is wrong with ``address``.
    """
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536) or "/" in host:
        raise ValueError(f"coordinator must be HOST:PORT with a port in 1..65535, got {address!r}")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"coordinator host {name!r} cannot be resolved "
                         f"({getattr(e, 'strerror', None) or e})") from None
    if process_id != 0:
        return
    # Process 0 serves the coordination service on every address ([::]:PORT, JAX's
    # default); a port in TIME_WAIT is fine (SO_REUSEADDR), a listening one is not.
    try:
        probe, any_address = socket.socket(socket.AF_INET6, socket.SOCK_STREAM), "::"
    except OSError:  # a host without IPv6
        probe, any_address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), ""
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((any_address, int(port)))
        except OSError as e:
            raise ValueError(f"coordinator port {port} cannot be served here (process 0 "
                             f"runs the coordination service): {e.strerror}") from None


def make_mesh(axis_name: str = DATA_AXIS, devices: list | None = None) -> Mesh:
    """A one-axis mesh over all devices of all processes.

    Args:
      axis_name: the mesh axis name batches are split over.
      devices: the devices to use; ``jax.devices()`` (global) when None.

    Returns:
      The ``Mesh``.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devs), (axis_name,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's first axis.

    Args:
      mesh: the mesh.

    Returns:
      ``NamedSharding(mesh, P(axis))``.
    """
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh.

    Args:
      mesh: the mesh.

    Returns:
      ``NamedSharding(mesh, P())``.
    """
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of a batch into global, batch-sharded arrays.

    Process ``p`` passes its ``p``-th slice of the global batch (what
    ``train.data.Loader`` yields); the result is the concatenation in process
    order, split over the mesh. On a single process it is a sharded
    ``device_put``.

    Args:
      local: name -> array whose first axis is this process's part of the batch.
      mesh: the mesh from ``make_mesh``.

    Returns:
      name -> ``jax.Array`` of global batch size, sharded along the batch axis.

    Raises:
      ValueError: when a local batch does not split evenly over the local devices.
    """
    sharding = batch_sharding(mesh)
    n_local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % max(n_local, 1):
            raise ValueError(f"batch entry {name!r} of shape {value.shape}: the per-process batch "
                             f"must be divisible by the {n_local} local device(s)")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def replicate(tree: _T, mesh: Mesh) -> _T:
    """Place a pytree (parameters, optimizer state) on every device of the mesh.

    Every process must pass the same values (same seed, or the same
    checkpoint): each contributes its own copy for its own devices.

    Args:
      tree: a pytree of arrays (e.g. an ``nnx.State``).
      mesh: the mesh.

    Returns:
      The same tree of replicated ``jax.Array``.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        tree)


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints, logs and writes summaries.

    Returns:
      True on process 0 (and in every single-process run).
    """
    return jax.process_index() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only.

    Args:
      *args: what ``print`` takes.
      **kwargs: what ``print`` takes.
    """
    if is_main_process():
        print(*args, **kwargs)


def progress(iterable: Iterable[_T] | None = None, **tqdm_kwargs: Any) -> Iterable[_T]:
    """A progress bar (``jaxnets.cli.progress_bar``: tqdm's, or lines in a log) shown by
    process 0 and silent elsewhere.

    Args:
      iterable: what to iterate over (or None with ``total=`` for manual updates).
      **tqdm_kwargs: tqdm options (``total``, ``desc``, ``unit``...).

    Returns:
      The tqdm object (disabled on processes other than 0).
    """
    from jaxnets.cli import progress_bar

    tqdm_kwargs.setdefault("disable", not is_main_process())
    return progress_bar(iterable, **tqdm_kwargs)


def configure_logging(level: int = logging.INFO) -> None:
    """Log at ``level`` on process 0 and only warnings and errors elsewhere.

    Each record carries the process index so that interleaved output from
    several hosts can be told apart.

    Args:
      level: the level for process 0.
    """
    fmt = f"%(asctime)s [p{jax.process_index()}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if is_main_process() else logging.WARNING, format=fmt,
                        force=True)


def _policy(precision):
    from train.precision import Policy, get_policy

    return precision if isinstance(precision, Policy) else get_policy(precision)


def make_sharded_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                      mesh: Mesh | None = None, precision: Any = "fp32",
                      donate: bool = True, aux_weight: float = 0.4):
    """A jitted data-parallel classification train step (cross-entropy, optax update).

    The model is split as ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
    ``rest`` holds the BatchNorm statistics (and anything else that is not a
    Param), which the train-mode forward updates. With a mesh, parameters,
    ``rest`` and the optimizer state are replicated and the batch is split
    over the mesh (``batch_sharding``); the gradient and the BatchNorm batch
    statistics are then global (XLA inserts the all-reduces).

    Args:
      graphdef: the model's graph definition.
      tx: the optax optimizer; its state must come from ``tx.init(params)``.
      mesh: the device mesh, or None for the default device.
      precision: ``"fp32"``, ``"bf16"`` or a ``train.precision.Policy``.
      donate: donate the parameter, ``rest`` and optimizer-state buffers
        (they are replaced by the outputs; saves a copy of each per step).
      aux_weight: weight of each auxiliary classifier's cross-entropy (GoogLeNet,
        Inception v3: ``train.steps.logits_and_aux``).

    Returns:
      ``step(params, rest, opt_state, images, labels) -> (params, rest,
      opt_state, loss)``; ``labels`` are integer class indices.
    """
    from train.steps import logits_and_aux

    policy = _policy(precision)

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, rest, opt_state, images, labels):
        # copy=True: the forward writes BatchNorm statistics, and NNX lets a
        # Variable be written only under the trace that created it.
        def loss_fn(p, r):
            model = nnx.merge(graphdef, policy.cast_params(p), r, copy=True)
            logits, aux = logits_and_aux(policy.cast_output(model(policy.cast_inputs(images))))
            loss = cross_entropy(logits, labels)
            if aux_weight:
                loss = loss + aux_weight * sum(cross_entropy(z, labels) for z in aux)
            return loss, nnx.split(model, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    donate_argnums = (0, 1, 2) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, rep, rep, data, data),
                   out_shardings=(rep, rep, rep, rep), donate_argnums=donate_argnums)


def make_predict_step(graphdef: nnx.GraphDef, *, mesh: Mesh | None = None,
                      precision: Any = "fp32"):
    """A jitted eval-mode forward pass returning float32 logits.

    Args:
      graphdef: the model's graph definition (split as in ``make_sharded_step``).
      mesh: the device mesh, or None for the default device.
      precision: ``"fp32"``, ``"bf16"`` or a ``train.precision.Policy``.

    Returns:
      ``predict(params, rest, images) -> logits`` (batch-sharded with a mesh).
    """
    policy = _policy(precision)

    def predict(params, rest, images):
        model = nnx.merge(graphdef, policy.cast_params(params), rest)
        model.eval()
        return policy.cast_output(model(policy.cast_inputs(images)))

    if mesh is None:
        return jax.jit(predict)
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(predict, in_shardings=(rep, rep, data), out_shardings=data)
