"""train.finetune's multi-device layer and bf16: sharded steps, --precision, multi-host flags.

The sharded comparison runs in a subprocess with 8 virtual CPU devices
(``--xla_force_host_platform_device_count=8`` must be set before JAX starts).
It uses fp32 with plain SGD at a small learning rate: a data-parallel step sums
the batch in a different order than a one-device step, and fp32 round-off in
the BatchNorm gradients (~1e-3 relative) would otherwise exceed 1e-5 in the
parameters after a step; a step of 1e-3 keeps that far below the tolerance
while moving the parameters by much more than it.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = ["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--no-progress"]

_SHARDED_SCRIPT = textwrap.dedent("""
    import json

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jaxnets.resnet import BasicBlock, ResNet
    from train import distributed, steps
    from train.augment import AugmentConfig

    assert jax.device_count() == 8, jax.devices()
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=5, rngs=nnx.Rngs(0))
    parts, params, stats = steps.split_model(model, r"^fc\\.")
    params, stats = jax.device_get((params, stats))
    # Random crops and flips stay on: the step draws them for the global batch
    # inside one jit program, so they do not depend on how the batch is split.
    aug = AugmentConfig(crop_size=16, resize_size=16, scale=(0.35, 1.0), flip_prob=0.5)
    tx = optax.sgd(1e-3)
    rng = np.random.default_rng(1)
    batches = [{"image": rng.integers(0, 255, (16, 20, 20, 3), dtype=np.uint8),
                "label": rng.integers(0, 5, 16).astype(np.int32),
                "mask": np.arange(16) < 14} for _ in range(3)]

    def run(mesh):
        state = distributed.replicate(steps.init_state(params, stats, tx, seed=3), mesh)
        train_step = steps.make_train_step(parts, tx, augment=aug, num_classes=5, mesh=mesh)
        eval_step = steps.make_eval_step(parts, augment=aug, num_classes=5, mesh=mesh)
        losses = []
        for batch in batches:
            gb = distributed.global_batch(batch, mesh)
            state, m = train_step(state, gb)
            losses.append(float(m["loss"]))
        out = eval_step(state, distributed.global_batch(batches[0], mesh))
        devices = {len(state["params"][k].sharding.device_set) for k in state["params"]}
        return jax.device_get(state), losses, jax.device_get(out), devices, len(
            gb["image"].sharding.device_set)

    s8, l8, e8, dev8, bdev8 = run(distributed.make_mesh())
    s1, l1, e1, dev1, bdev1 = run(distributed.make_mesh(devices=jax.devices()[:1]))
    diff = lambda a, b: max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    moved = max(float(np.max(np.abs(s1["params"][k] - params[k]))) for k in params)
    print(json.dumps({
        "param_diff": diff(s8["params"], s1["params"]),
        "stat_diff": diff(s8["batch_stats"], s1["batch_stats"]),
        "stats_moved": diff(s1["batch_stats"], stats),
        "moved": moved, "losses8": l8, "losses1": l1,
        "logit_diff": float(np.max(np.abs(e8["logits"] - e1["logits"]))),
        "pred_equal": bool(np.array_equal(e8["pred"], e1["pred"])),
        "state_devices": sorted(dev8 | dev1), "batch_devices": [bdev8, bdev1],
        "steps": [int(s8["step"]), int(s1["step"])],
    }))
""")


def _env(devices: int) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run_on_8_devices(script: str) -> dict:
    """Run a script in a process with 8 CPU devices; the JSON of its last line."""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# What the collective-counting scripts share: a 1-d "data" mesh over the devices and
# ``collectives(hlo)``, the collective operations of a compiled program by kind.
_COLLECTIVES_PRELUDE = textwrap.dedent("""
    import collections, json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    kinds = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

    def collectives(hlo):
        ops = re.findall(r"= \\S+ ([a-z-]+?)(?:-start)?\\(", hlo)
        return collections.Counter(o for o in ops if o in kinds)
""")


_VIT_COLLECTIVES_SCRIPT = _COLLECTIVES_PRELUDE + textwrap.dedent("""
    from flax import nnx
    from jaxnets import vit

    x = jax.device_put(jnp.ones((16, 32, 32, 3)), NamedSharding(mesh, P("data")))

    def program():
        model = vit.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                      hidden_dim=32, mlp_dim=64, num_classes=5,
                                      rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.device_put(params, NamedSharding(mesh, P()))
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
        hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
        return {k: hlo.count(f" {k}(") + hlo.count(f" {k}-start(")
                for k in kinds + ("conditional",)}

    with_barrier = program()
    vit.fusion_barrier = lambda x, anchor=None: x
    print(json.dumps({"barrier": with_barrier, "identity": program()}))
""")


_CONV_COLLECTIVES_SCRIPT = _COLLECTIVES_PRELUDE + textwrap.dedent("""
    from jaxnets import layers

    x = jax.device_put(jnp.ones((64, 32, 32, 64)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((3, 3, 64, 64)), NamedSharding(mesh, P()))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(w, x):
        y = layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        return jnp.sum(y ** 2)

    grad = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, P()))
    eqns = jax.make_jaxpr(jax.grad(loss))(w, x).eqns
    print(json.dumps({"collectives": collectives(grad.lower(w, x).compile().as_text()),
                      "conv_ndims": [e.invars[0].aval.ndim for e in eqns
                                     if e.primitive.name == "conv_general_dilated"]}))
""")


_DENSE_COLLECTIVES_SCRIPT = _COLLECTIVES_PRELUDE + textwrap.dedent("""
    from jaxnets import layers

    x = jax.device_put(jnp.ones((16, 10, 32)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((32, 24)), NamedSharding(mesh, P()))

    def gradient_collectives(dot):
        loss = lambda w, x: jnp.sum(dot(x, w, (((2,), (0,)), ((), ()))) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)),
                       out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
        return collectives(grad.lower(w, x).compile().as_text())

    print(json.dumps({"jaxnets": gradient_collectives(layers.dot_general),
                      "lax": gradient_collectives(jax.lax.dot_general)}))
""")


def test_dense_on_sharded_tokens_keeps_lax_collectives_over_8_devices():
    """``layers.dot_general`` merges a batch-sharded (B, L, K) input's leading axes on
    CPU: the merged rows stay sharded, so the gradient program has ``lax``'s
    collectives: one all-reduce for the kernel gradient, no gather."""
    r = _run_on_8_devices(_DENSE_COLLECTIVES_SCRIPT)
    assert r["jaxnets"] == r["lax"] == {"all-reduce": 1}, r


def test_vit_fusion_barriers_add_no_collective_over_8_devices():
    """``EncoderBlock``'s ``fusion_barrier``s read their predicate from a LayerNorm
    scale (replicated), not from the batch-sharded tokens: the data-parallel gradient
    program has the same collectives as without them (reading a token instead added
    one all-reduce per barrier)."""
    r = _run_on_8_devices(_VIT_COLLECTIVES_SCRIPT)
    barrier, identity = r["barrier"], r["identity"]
    assert barrier.pop("conditional") >= 4 and identity.pop("conditional") == 0, r
    assert barrier == identity and identity["all-reduce"] >= 1, r


def test_conv_weight_gradient_over_8_devices_is_partial_sums_and_one_all_reduce():
    """The 1-d convolution kernel gradient (``layers._conv_weight_grad``) keeps the
    sharded batch sharded: each device sums its own images and one all-reduce adds
    them up. (With the rows as the major contracted features, XLA gathered the whole
    input and output gradient onto every device instead.)"""
    r = _run_on_8_devices(_CONV_COLLECTIVES_SCRIPT)
    assert sorted(r["conv_ndims"]) == [3, 4], r  # forward 2-d; kernel gradient 1-d
    assert r["collectives"] == {"all-reduce": 1}, r


def test_train_step_on_8_devices_matches_one_device():
    r = _run_on_8_devices(_SHARDED_SCRIPT)
    assert r["steps"] == [3, 3]
    assert r["batch_devices"] == [8, 1]
    assert r["state_devices"] == [1, 8]
    # The comparison means something only if the parameters and statistics moved.
    assert r["moved"] > 1e-4 and r["stats_moved"] > 1e-3, r
    assert r["param_diff"] <= 1e-5, r
    assert r["stat_diff"] <= 1e-5, r
    np.testing.assert_allclose(r["losses8"], r["losses1"], rtol=1e-5)
    assert r["logit_diff"] <= 1e-4 and r["pred_equal"], r


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def test_cli_on_8_devices_matches_1_device_and_rejects_an_indivisible_batch(tmp_path):
    from train.data import load_dataset

    summaries = {}
    for devices in (8, 1):
        run_dir = str(tmp_path / f"run{devices}")
        args = [sys.executable, "-m", "train.finetune", *LENET, "--steps", "30",
                "--batch-size", "32", "--eval-batch-size", "64", "--output-dir", run_dir]
        proc = subprocess.run(args, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{devices} device(s) in 1 process(es)" in proc.stderr
        summaries[devices] = _summary(run_dir)
    s8, s1 = summaries[8], summaries[1]
    # Every val image is counted once, whatever the padding of the last sharded batch.
    assert s8["val_count"] == len(load_dataset("digits", split="val", seed=0))
    assert s8["step"] == 30 and s8["val_count"] == s1["val_count"]
    assert s8["val_top1"] > 0.3, s8  # trained: chance is 0.1
    # At most one image apart (summation order differs across devices); counted in
    # images, since 1/359 as a float difference of two accuracies can land above 1/359.
    assert round(abs(s8["val_top1"] - s1["val_top1"]) * s8["val_count"]) <= 1, summaries
    assert s8["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-3), summaries

    bad = args[:-1] + [str(tmp_path / "bad"), "--batch-size", "36"]
    proc = subprocess.run(bad, cwd=REPO, env=_env(8), capture_output=True, text=True,
                          timeout=600)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("error: --batch-size 36 must be divisible by the 8 devices"), err


def test_bf16_run_matches_fp32_accuracy_and_saves_fp32_params(tmp_path, capsys):
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpointer

    from bench.precision import compare

    # bench.precision's runner: the same two runs that `python -m bench.precision` makes,
    # for two seeds. One run's accuracy moves by a point or more with any change of
    # rounding: with SGD (`python -m bench.precision --arch lenet5 --image-size 32
    # --seed S`, seeds 0-5) fp32 and bf16 differed by up to 2.2 points either way (4.2
    # before layers' 1-d weight gradient changed the rounding). With
    # AdamW (`... --epochs 12 --seed S -- --optimizer adamw --lr 3e-3`) the runs settle:
    # within 0.83 points on each of seeds 0-3. The test takes the mean of two seeds.
    results = [compare(LENET + ["--epochs", "12", "--optimizer", "adamw", "--lr", "3e-3",
                                "--batch-size", "64", "--seed", str(seed)],
                       str(tmp_path / f"seed{seed}"))
               for seed in (0, 1)]
    capsys.readouterr()
    for r in results:
        fp32, bf16 = r["fp32"]["val_top1"], r["bf16"]["val_top1"]
        assert fp32 > 0.9 and bf16 > 0.9, r  # trained models: the comparison means something
        assert r["drop_points"] == pytest.approx(100 * (fp32 - bf16), abs=0.01)
    mean_drop = sum(r["drop_points"] for r in results) / len(results)
    assert abs(mean_drop) <= 1.0, results
    with pytest.raises(ValueError, match="--precision"):
        compare(LENET + ["--precision", "bf16"], str(tmp_path))
    with open(os.path.join(str(tmp_path / "seed0" / "bf16"), "config.json")) as f:
        assert json.load(f)["precision"] == "bf16"

    ck = Checkpointer(os.path.join(str(tmp_path / "seed0" / "bf16"), "checkpoints"))
    state = ocp.StandardCheckpointer().restore(
        os.path.join(ck.directory, str(max(ck.steps())), "state"))
    dtypes = {str(np.asarray(v).dtype) for group in ("params", "batch_stats")
              for v in state[group].values()}
    assert dtypes == {"float32"}, dtypes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(run_dir):
    import jax
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpointer

    ck = Checkpointer(os.path.join(run_dir, "checkpoints"))
    step = max(ck.steps())
    # Saved across the devices of another topology: read onto this process's device.
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        os.path.join(ck.directory, str(step), "state"),
        args=ocp.args.StandardRestore(fallback_sharding=here))
    return step, {k: np.asarray(v) for k, v in state["params"].items()}


def test_cli_on_two_processes_matches_one_process_with_two_devices(tmp_path):
    """``train.finetune`` itself under ``jax.distributed``: two CPU processes on
    127.0.0.1 (one device each) against one process with two devices, same
    global batches. Covers per-process data shards, the eval gather across
    processes, Orbax's collective checkpoint save, process-0-only output, and a
    resume of both past an unreadable checkpoint."""
    cmd = [sys.executable, "-m", "train.finetune", *LENET, "--steps", "20", "--batch-size",
           "32", "--eval-batch-size", "64"]
    multi_dir = str(tmp_path / "multi")

    def run_two():
        port = _free_port()
        procs = [subprocess.Popen(
            cmd + ["--output-dir", multi_dir, "--checkpoint-every", "10", "--coordinator",
                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        try:
            outs = [p.communicate(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return outs

    (out0, err0), (out1, err1) = run_two()
    # Only process 0 prints: the run line, the result.
    assert "2 device(s) in 2 process(es)" in err0 and "device(s)" not in err1, (err0, err1)
    # (Gloo's own connection line comes from C++ in every process.)
    out1 = [line for line in out1.splitlines() if not line.startswith("[Gloo]")]
    assert "val top-1" in out0 and out1 == [], (out0, out1)

    single_dir = str(tmp_path / "single")
    proc = subprocess.run(cmd + ["--output-dir", single_dir], cwd=REPO, env=_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s) in 1 process(es)" in proc.stderr

    from train.data import load_dataset

    multi, single = _summary(multi_dir), _summary(single_dir)
    # The gathered evaluation counts every val image once.
    assert multi["val_count"] == single["val_count"] == len(
        load_dataset("digits", split="val", seed=0))
    assert multi["step"] == single["step"] == 20
    # Trained (chance: top-1 0.1, loss ln 10 = 2.303), so the comparison means something.
    assert multi["val_loss"] < 2.25, multi
    assert abs(multi["val_top1"] - single["val_top1"]) <= 1 / multi["val_count"], (multi, single)
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4), (multi, single)
    # The checkpoint both processes saved together is the one-process result.
    step_m, params_m = _final_params(multi_dir)
    step_s, params_s = _final_params(single_dir)
    assert step_m == step_s == 20 and set(params_m) == set(params_s)
    for k in params_s:
        np.testing.assert_allclose(params_m[k], params_s[k], rtol=1e-5, atol=1e-5, err_msg=k)

    # The last checkpoint unreadable: both processes fall back to step 10 together,
    # process 0 moves step 20 aside, and the two write step 20 anew: the same result.
    for f in glob.glob(os.path.join(multi_dir, "checkpoints", "20", "state", "**", "d", "*"),
                       recursive=True):
        with open(f, "wb") as fh:
            fh.write(b"corrupt")
    (_, err0), (_, err1) = run_two()
    assert "from step 10" in err0 and "20.unreadable" in err0, err0[-3000:]
    assert "Traceback" not in err0 + err1, (err0 + err1)[-3000:]
    assert sorted(os.listdir(os.path.join(multi_dir, "checkpoints"))) == ["10", "20",
                                                                           "20.unreadable"]
    step_m, params_m = _final_params(multi_dir)
    assert step_m == 20
    for k in params_s:
        np.testing.assert_allclose(params_m[k], params_s[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_killed_process_stops_the_other_at_once_with_one_line(tmp_path):
    """kill -9 of process 1 mid-run: process 0 says so in one line and exits 3 within
    seconds (JAX's shutdown would wait out the heartbeat timeout, then abort), keeping
    the checkpoints written."""
    import time

    out = str(tmp_path / "run")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train.finetune", *LENET, "--steps", "5000", "--batch-size", "32",
         "--checkpoint-every", "10", "--output-dir", out, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        checkpoints = os.path.join(out, "checkpoints")
        deadline = time.time() + 300
        while not (os.path.isdir(checkpoints)
                   and any(n.isdigit() for n in os.listdir(checkpoints))):
            assert time.time() < deadline and procs[0].poll() is None, "no checkpoint written"
            time.sleep(0.2)
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 3, err[-3000:]
    assert waited < 30, waited
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "a process of the job failed or was lost" in ours[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert any(n.isdigit() for n in os.listdir(checkpoints))


@pytest.mark.parametrize("extra, needle", [
    (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes, --process-id"),
    (["--num-processes", "2", "--process-id", "0"], "--num-processes, --process-id needs "
                                                    "--coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "not in [0, 2)"),
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--precision", "fp16"], "--precision"),
])
def test_multihost_and_precision_flags_are_validated(extra, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(LENET + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_help_documents_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--precision", "--coordinator", "--num-processes", "--process-id"):
        assert flag in out
