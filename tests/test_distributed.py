"""Data-parallel training on a mesh equals single-device training on the global batch.

The training runs compare in float64 (``JAX_ENABLE_X64``): in fp32 the
gradients of BatchNorm biases are sums that nearly cancel, and merely summing
the batch in another order (per device, then across devices) moves them by
~1e-3 of their size after one step (see ``porting/parity.py``). In float64 the
same reordering is ~1e-12, so a tolerance of 1e-5 tests the data-parallel
computation, not the rounding.

The multi-device checks run in subprocesses: the host platform's device count
(``--xla_force_host_platform_device_count``) and ``jax.distributed`` must be
set before JAX initialises its backend, which this test process has already
done with one device. The subprocesses run this file as a script
(``python tests/test_distributed.py MODE ...``); the test functions compare
what they write.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCH, SIZE, BATCH, STEPS = "tiny_bn", 8, 16, 3


# ---------------------------------------------------------------------------
# Worker side (runs in a subprocess).


def _tiny_bn_net():
    """Two conv-BN-ReLU stages and a linear head: BatchNorm at two depths, fast to compile."""
    from flax import nnx

    from jaxnets.layers import BatchNorm, conv2d, linear

    class TinyBN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = conv2d(3, 8, 3, 1, 1, bias=False, rngs=rngs)
            self.bn1 = BatchNorm(8)
            self.conv2 = conv2d(8, 16, 3, 2, 1, bias=False, rngs=rngs)
            self.bn2 = BatchNorm(16)
            self.fc = linear(16, 10, rngs=rngs)

        def __call__(self, x):
            import jax

            x = jax.nn.relu(self.bn1(self.conv1(x)))
            x = jax.nn.relu(self.bn2(self.conv2(x)))
            return self.fc(x.mean(axis=(1, 2)))

    return TinyBN(nnx.Rngs(0))


def _flat(state) -> dict[str, np.ndarray]:
    from flax import nnx

    # addressable_data(0): a replicated array spanning several processes
    # cannot be fetched whole, but every process holds a full copy.
    return {".".join(map(str, k)): np.asarray(v.get_value().addressable_data(0))
            for k, v in nnx.to_flat_state(state)}


def _data(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    # Shifted, scaled inputs so that per-shard BatchNorm statistics would
    # clearly differ from the global ones.
    images = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    images *= np.linspace(0.5, 3.0, BATCH, dtype=np.float32)[:, None, None, None]
    images += np.linspace(-1.0, 1.0, BATCH, dtype=np.float32)[:, None, None, None]
    return images, rng.integers(0, 10, BATCH).astype(np.int32)


def _train(mesh, steps: int, part: slice = slice(None), arch: str = ARCH, *,
           keep_going: bool = False, save: str = ""):
    """``steps`` SGD-momentum steps of a fresh model; each process feeds ``part`` of the batch.

    With ``save`` the state after ``steps`` steps is written there; with
    ``keep_going`` training then continues until the process is stopped.
    """
    import optax
    from flax import nnx

    import jaxnets
    from train import distributed as dist

    import jax
    import jax.numpy as jnp

    model = _tiny_bn_net() if arch == "tiny_bn" else jaxnets.create_model(arch, num_classes=10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f64 = lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa
    params, rest = jax.tree.map(f64, params), jax.tree.map(f64, rest)
    tx = optax.sgd(0.05, momentum=0.9)
    params, rest = dist.replicate(params, mesh), dist.replicate(rest, mesh)
    opt_state = dist.replicate(tx.init(params), mesh)
    step = dist.make_sharded_step(graphdef, tx, mesh=mesh)
    i = 0
    while i < steps or keep_going:
        images, labels = _data(min(i, steps - 1))
        batch = dist.global_batch({"image": images[part].astype(np.float64),
                                   "label": labels[part]}, mesh)
        params, rest, opt_state, loss = step(params, rest, opt_state, batch["image"],
                                             batch["label"])
        print(f"step {i} loss {float(loss.addressable_data(0)):.6f}", flush=True)
        i += 1
        if i == steps and save:
            _save(save, params, rest)
            print("saved", flush=True)
    return params, rest


def _save(path: str, params, rest) -> None:
    np.savez(path, **{"param/" + k: v for k, v in _flat(params).items()},
             **{"rest/" + k: v for k, v in _flat(rest).items()})


def worker_mesh8(out: str) -> None:
    """8 host devices vs 1, and a per-shard control run."""
    import jax

    from train import distributed as dist

    assert jax.device_count() == 8, jax.devices()
    mesh8 = dist.make_mesh()
    mesh1 = dist.make_mesh(devices=jax.devices()[:1])
    _save(os.path.join(out, "mesh8.npz"), *_train(mesh8, STEPS))
    _save(os.path.join(out, "mesh1.npz"), *_train(mesh1, STEPS))
    # What non-synchronised BatchNorm would see on device 0: its own shard only.
    _save(os.path.join(out, "shard0.npz"), *_train(mesh1, 1, slice(0, BATCH // 8)))
    _save(os.path.join(out, "mesh8_1step.npz"), *_train(mesh8, 1))


def worker_multi(args) -> None:
    """One process of a 2-process job on 127.0.0.1.

    Trains ``STEPS`` steps on its half of each global batch and saves the
    result, then keeps training (on the same batch) until a peer dies, so that
    the test can kill one process and watch the other.
    """
    import jax

    from train import distributed as dist

    dist.initialize(f"127.0.0.1:{args.port}", 2, args.process_id, timeout_s=120,
                    heartbeat_timeout_s=10)
    mesh = dist.make_mesh()
    assert jax.process_count() == 2 and mesh.devices.size == 2
    per = BATCH // 2
    part = slice(args.process_id * per, (args.process_id + 1) * per)
    _train(mesh, STEPS, part, keep_going=True,
           save=os.path.join(args.out, f"multi2_p{args.process_id}.npz"))


def _worker_main(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    import jax

    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mesh8", "multi"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "mesh8":
        worker_mesh8(args.out)
    else:
        worker_multi(args)


# ---------------------------------------------------------------------------
# Test side: one scenario, run once, checked by several tests.


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def _spawn(*args: str, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(proc: subprocess.Popen, text: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {text!r}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
    raise AssertionError(f"no {text!r} before the deadline")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Run the 8-device worker and a 2-process job side by side; kill process 1 at the end.

    Returns:
      dict with ``out`` (the folder of saved states), ``survivor_rc``,
      ``survivor_err`` and ``survivor_s`` (seconds from the kill to its exit,
      None if it was still running after 60 s).
    """
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    mesh8 = _spawn("mesh8", "--out", str(out), devices=8)
    multi = [_spawn("multi", "--out", str(out), "--port", str(port), "--process-id", str(i))
             for i in range(2)]
    result = {"out": out}
    try:
        deadline = time.monotonic() + 400
        for p in multi:
            _wait_for(p, "saved", deadline)
        multi[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            _, err = multi[0].communicate(timeout=60)
            result.update(survivor_rc=multi[0].returncode, survivor_err=err,
                          survivor_s=time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            result.update(survivor_rc=None, survivor_err="", survivor_s=None)
        try:
            _, err = mesh8.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise AssertionError("the 8-device worker timed out")
        assert mesh8.returncode == 0, f"8-device worker failed:\n{err[-3000:]}"
    finally:
        for p in [mesh8, *multi]:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return result


def _load(folder: Path, name: str) -> dict[str, np.ndarray]:
    return dict(np.load(folder / name))


def _max_rel(a: dict, b: dict) -> tuple[float, str]:
    worst, name = 0.0, ""
    for k in b:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        err = float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30)
        if err >= worst:
            worst, name = err, k
    return worst, name


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what}: {k}")


def test_mesh_of_8_devices_equals_one_device(scenario):
    got, want = _load(scenario["out"], "mesh8.npz"), _load(scenario["out"], "mesh1.npz")
    stats = [k for k in want if k.endswith((".mean", ".var"))]
    assert len(stats) == 4 and all(want[k].dtype == np.float64 for k in stats)
    _assert_close(got, want, "8 devices vs 1 device after 3 steps")
    # Control: device 0's own shard gives clearly different statistics, so the
    # agreement above means the statistics were synchronised (SyncBatchNorm).
    one, shard0 = _load(scenario["out"], "mesh8_1step.npz"), _load(scenario["out"], "shard0.npz")
    err, name = _max_rel({k: one[k] for k in stats}, {k: shard0[k] for k in stats})
    assert err > 1e-2, f"per-shard statistics match the global ones ({name}: {err})"


def test_two_processes_equal_one_process_on_the_global_batch(scenario):
    # mesh1.npz: the same model, steps and global batches on one device of one process.
    want = _load(scenario["out"], "mesh1.npz")
    for i in range(2):
        _assert_close(_load(scenario["out"], f"multi2_p{i}.npz"), want,
                      f"2 processes (process {i}) vs 1 process")


def test_killed_process_fails_the_other_in_bounded_time(scenario):
    assert scenario["survivor_s"] is not None, "the survivor hung for 60 s after its peer died"
    assert scenario["survivor_rc"] != 0
    err = scenario["survivor_err"]
    # Either the collective notices the closed connection or the coordination
    # service notices the missing heartbeats; both say so.
    assert ("Connection closed by peer" in err or "another task died" in err
            or "heartbeat" in err), err[-3000:]


# ---------------------------------------------------------------------------
# In-process checks of the helpers (one CPU device here).


def test_single_device_helpers():
    import jax

    from train import distributed as dist

    assert dist.initialize() is False  # no coordinator, not a TPU VM: a no-op
    mesh = dist.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    batch = dist.global_batch({"image": np.ones((4, 2, 2, 1), np.float32),
                               "label": np.arange(4)}, mesh)
    assert batch["image"].shape == (4, 2, 2, 1)
    assert batch["image"].sharding == dist.batch_sharding(mesh)
    tree = dist.replicate({"w": np.ones(3, np.float32)}, mesh)
    assert tree["w"].sharding.is_fully_replicated
    assert dist.is_main_process()
    assert list(dist.progress(range(3))) == [0, 1, 2]


def test_bad_arguments_are_named():
    from train import distributed as dist

    with pytest.raises(ValueError, match="num_processes and process_id"):
        dist.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"not in \[0, 2\)"):
        dist.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        dist.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="without a coordinator"):
        dist.initialize(None, 2, 1)


def test_coordinator_addresses_are_checked_before_jax_waits_on_them(monkeypatch, tmp_path, capsys):
    """A malformed or unresolvable address would be waited on for the whole
    initialisation timeout; a port already served fails process 0 with a traceback or a
    crash inside JAX. Each is one ValueError (finetune: one line, exit 2) instead."""
    import socket

    from train import distributed as dist
    from train import finetune

    for bad in ("http://h:12", "h:70000", "h:0", ":123", "h:"):
        with pytest.raises(ValueError, match="must be HOST:PORT with a port in 1..65535"):
            dist.check_coordinator(bad, 0)
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "nosuchhost.invalid":
            raise socket.gaierror(-2, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(ValueError, match=r"host 'nosuchhost.invalid' cannot be resolved "
                                         r"\(Name or service not known\)"):
        dist.check_coordinator("nosuchhost.invalid:1234", 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"coordinator port {port} cannot be served here"):
            dist.check_coordinator(f"127.0.0.1:{port}", 0)
        dist.check_coordinator(f"127.0.0.1:{port}", 1)  # another process only connects
        dist.check_coordinator(f"[::1]:{port}", 1)
        assert finetune.main(["--arch", "mlp", "--dataset", "digits", "--weights", "none",
                              "--steps", "1", "--no-progress", "--output-dir",
                              str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", "2", "--process-id", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --coordinator: coordinator port") and "\n" not in err
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
