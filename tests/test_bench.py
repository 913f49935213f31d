"""bench.train_step runs both frameworks and reports sane figures; bad input is one line."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import pytest

from bench.train_step import bench_arch, format_table, main


def test_short_benchmark_of_two_models():
    precision_before = jax.config.jax_default_matmul_precision
    results = [bench_arch("lenet5", batch=2, size=32, precision="bf16", steps=2, warmup=0,
                          compile_too=False),
               bench_arch("resnet18_cifar", batch=2, size=8, precision="fp32", steps=1,
                          warmup=0, compile_too=False)]
    for r in results:
        for name in ("jax_ms", "torch_ms", "jax_compile_s", "jax_infer_ms", "torch_infer_ms",
                     "jax_peak_mib", "torch_peak_mib"):
            value = getattr(r, name)
            assert math.isfinite(value) and value > 0, (r.arch, name, value)
        assert r.compiled_note == "not run" and math.isnan(r.compiled_ms)
        assert math.isclose(r.ratio, r.torch_ms / r.jax_ms)
    table = format_table(results).splitlines()
    assert len(table) == 4 and table[2].startswith("| lenet5 | 2 | 32 | bf16 |")
    # The benchmark's TF32 choice is scoped: the suite's "highest" survives it.
    assert jax.config.jax_default_matmul_precision == precision_before


def test_both_sides_weigh_auxiliary_classifiers_alike():
    """GoogLeNet's and Inception v3's train-mode outputs (main logits, then the
    auxiliary ones) give the same loss on both sides: the main cross-entropy plus
    ``AUX_WEIGHT`` times each auxiliary one."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision.models.googlenet import GoogLeNetOutputs as TorchOutputs

    from bench import train_step
    from jaxnets.googlenet import GoogLeNetOutputs

    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3)]
    target = rng.integers(0, 6, 4)
    ours = float(train_step._jax_loss(GoogLeNetOutputs(*map(jax.numpy.asarray, logits)),
                                      jax.numpy.asarray(target, np.int32), "image"))
    theirs = float(train_step._torch_loss(TorchOutputs(*map(torch.from_numpy, logits)),
                                          torch.from_numpy(target), "image"))
    ce = [float(F.cross_entropy(torch.from_numpy(z), torch.from_numpy(target))) for z in logits]
    assert math.isclose(ours, theirs, rel_tol=1e-6)
    assert math.isclose(ours, ce[0] + train_step.AUX_WEIGHT * (ce[1] + ce[2]), rel_tol=1e-6)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--arch", "lenet5", "--short", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text(), parse_constant=_no_nan)  # strict JSON
    assert row["arch"] == "lenet5" and row["batch"] == 4 and row["jax_ms"] > 0
    assert row["compiled_ms"] is None  # not measured here (torch.compile runs on CUDA)


def _no_nan(constant):
    raise AssertionError(f"{constant} in a JSON file")


def test_result_files_are_checked_first_and_written_whole(tmp_path, capsys):
    from bench.device_check import main as device_check
    from bench.output import json_path_problem, write_json
    from bench.port import main as port

    keep = tmp_path / "keep.json"
    keep.write_text("[1]\n")
    assert json_path_problem(str(tmp_path)) == f"{tmp_path} is a directory"
    assert "does not exist" in json_path_problem(str(tmp_path / "no" / "x.json"))
    assert json_path_problem(str(keep)) is None
    with pytest.raises(TypeError):  # not JSON: the earlier file stays, no temporary left
        write_json(str(keep), [object()])
    assert keep.read_text() == "[1]\n" and os.listdir(tmp_path) == ["keep.json"]
    write_json(str(keep), {"a": [1.5, float("nan"), (float("inf"), 2)]})
    assert json.loads(keep.read_text(), parse_constant=_no_nan) == {"a": [1.5, None, [None, 2]]}
    # Before any measuring: one line each.
    for argv, needle in ((["--arch", "lenet5", "--short", "--json", str(tmp_path)],
                          "is a directory"),
                         (["--arch", "lenet5", "--short", "--json", str(tmp_path / "no/x.json")],
                          "does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --json") and needle in err and "\n" not in err
    assert device_check(["--short", "--out", str(keep)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {keep}: a file, not a directory"
    assert port(["--arch", "lenet5"]) == 2
    assert "converts a torchvision checkpoint" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(capsys):
    assert main(["--arch", "resnet5O"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'resnet5O'") and "\n" not in err
    assert main(["--arch", "lenet5", "--size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: lenet5 needs inputs of at least 32 pixels, got 8"
    # Every model is checked before the first is measured (no lenet5 line here).
    assert main(["--short", "--arch", "lenet5", "mlp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mlp is a 'vector' model") and "\n" not in err
    assert main(["--short", "--arch", "lenet5", "--size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --size must be >= 1, got 0"


def _assert_timed(rows, keys, count):
    """Each row has ``count`` finite, positive timings under every key."""
    for r in rows:
        for key in keys:
            assert len(r[key]) == count and all(math.isfinite(v) and v > 0 for v in r[key]), r


def test_conv_ops_short_run(capsys, monkeypatch):
    """bench.conv_ops in its smoke mode: every convolution and dense shape timed three
    ways, finite and positive."""
    from bench import conv_ops

    # The rows main() prints, as its row functions return them (one run of each: the
    # compiles are most of this test's time).
    made = {}
    for name in ("conv_rows", "grouped_rows", "batchnorm_rows", "dense_rows", "attention_rows",
                 "pool_rows"):
        def keep(*args, _fn=getattr(conv_ops, name), _name=name, **kwargs):
            made[_name] = _fn(*args, **kwargs)
            return made[_name]
        monkeypatch.setattr(conv_ops, name, keep)
    assert conv_ops.main(["--short"]) == 0
    rows = made["conv_rows"]
    assert len(rows) == 10 and rows[0]["shape"] == "32x32 3->64 k7 s2"
    assert any("k1" in r["shape"] for r in rows) and any("k3 s2" in r["shape"] for r in rows)
    _assert_timed(rows, ("lax", "jaxnets", "torch"), 3)
    for r in rows:
        assert (r["row_dw"] is None) == (" k1 " in r["shape"]), r
        assert r["row_dw"] is None or (math.isfinite(r["row_dw"]) and r["row_dw"] > 0), r
    grouped = made["grouped_rows"]
    assert [r["shape"] for r in grouped] == ["8x8 128/32g k3 s1", "4x4 256/32g k3 s1",
                                             "2x2 512/32g k3 s1", "1x1 1024/32g k3 s1"]
    _assert_timed(grouped, ("lax", "jaxnets", "torch"), 3)
    bn = made["batchnorm_rows"]
    assert [r["shape"] for r in bn] == ["1x16x16x64", "1x8x8x256", "1x4x4x512", "1x2x2x1024"]
    dense = made["dense_rows"]
    assert [r["shape"] for r in dense] == ["1x5x768 -> 3072", "1x5x3072 -> 768",
                                           "1x5x768 -> 2304 (N, K)"]
    _assert_timed(dense, ("lax", "jaxnets", "torch"), 3)
    (attention,) = made["attention_rows"]
    assert attention["shape"] == "1x5x12x64"
    _assert_timed([attention], ("jax.nn", "jaxnets", "torch"), 2)
    pools = made["pool_rows"]
    assert [r["shape"] for r in pools] == ["1x16x16x64 k3 s2 p1", "1x16x16x64 k3 s2 p0 ceil",
                                           "1x4x4x192 k3 s1 p1 ceil"]
    _assert_timed(pools, ("lax", "jaxnets", "torch"), 2)
    out = capsys.readouterr().out
    assert "max-pool" in out and "1x4x4x192 k3 s1 p1 ceil" in out
    assert "8x8 64->256 k1 s1" in out and "BatchNorm+ReLU gradient" in out
    assert "dense layer" in out and "1x5x768 -> 2304 (N, K)" in out and "1x5x12x64" in out
    assert conv_ops.main(["--short", "--dtype", "float64"]) == 0  # parity's gradient dtype
    out = capsys.readouterr().out
    assert "float64" in out and "8x8 64->64 k3 s1" in out and "BatchNorm" not in out
    assert "grouped convolution" in out and "2x2 512/32g k3 s1" in out
    assert "dense layer" not in out
    assert not jax.config.jax_enable_x64  # switched on for the run only
    try:
        conv_ops.main(["--size", "12"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--size 12 accepted")


def test_profile_step_names_the_operations_of_a_short_run(tmp_path):
    """bench.profile_step in a fresh process (it sets XLA:CPU's per-operation trace
    flag before jax starts): it finds every operation of the profiled program, each
    with a kind, a shape and a positive time; the shares add up; bad input is one
    line and exit 2."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=repo, JAX_PLATFORMS="cpu")
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "bench.profile_step", "--arch", "lenet5",
                           "--batch", "2", "--steps", "1", "--top", "5", "--json", str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = json.loads(out.read_text())
    assert p["arch"] == "lenet5" and p["size"] == 32 and p["step_ms"] > 0
    # Every operation of the program is in the trace, whichever thread ran it (XLA:CPU
    # runs operations on the calling thread when its pool is busy, as under -n 2).
    assert len(p["ops"]) == p["program_ops"] > 20, (len(p["ops"]), p["program_ops"])
    kinds = {op["kind"] for op in p["ops"]}
    assert {"convolution", "dot"} & kinds and "elementwise" in kinds, kinds
    assert all(op["ms"] >= 0 and re.match(r"(\(|[a-z]+\d*\[)", op["shape"]) for op in p["ops"])
    assert sum(op["ms"] > 0 for op in p["ops"]) > len(p["ops"]) // 2
    assert math.isclose(sum(p["by_kind"].values()), sum(op["ms"] for op in p["ops"]))
    # LeNet's plain convolutions are XLA:CPU library calls, timed at their hand-over.
    handed = [op for op in p["ops"] if op["handed_over"]]
    assert handed and {op["kind"] for op in handed} <= {"dot", "convolution"}, handed
    assert any(k.endswith(" (handed over)") for k in p["by_kind"]), p["by_kind"]
    assert f"{len(handed)} operations (handed over)" in proc.stdout
    table = [row for row in proc.stdout.splitlines() if row.startswith("| ")]
    assert len(table) == 1 + 5 + 1 + len(p["by_kind"]), proc.stdout  # headers, rows
    assert "Largest fusions" in proc.stdout
    from bench import profile_step

    assert profile_step.main(["--arch", "resnet5O"]) == 2
    bad = subprocess.run([sys.executable, "-m", "bench.profile_step", "--arch", "lenet5",
                          "--size", "8"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: lenet5 needs inputs of at least 32 pixels, got 8"


_HLO = """HloModule m

%fc (p0: f32[4], p1: f32[4]) -> (f32[4], f32[4]) {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %add = f32[4]{0} add(%p0, %p1)
  %t = f32[4]{0} transpose(%add), dimensions={0}
  ROOT %tuple = (f32[4]{0}, f32[4]{0}) tuple(%add, %t)
}

ENTRY %main (a: f32[4], b: f32[4]) -> (f32[4], f32[]) {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %fusion.3 = (f32[4]{0}, f32[4]{0}) fusion(%a, %b), kind=kLoop, calls=%fc
  %gte = f32[4]{0} get-tuple-element(%fusion.3), index=0
  %d = f32[] dot(%gte, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %r = (f32[4]{0}, f32[]) tuple(%gte, %d)
}
"""


def test_profile_step_reads_compiled_hlo_text():
    """Instructions are named with their kind, shape and fusion operands, a
    multi-output fusion (a tuple shape, spaces inside) included, and plain dots marked
    as library calls; the program's operations are its entry instructions less
    parameters, tuples and their elements."""
    from bench.profile_step import describe_instructions, program_operations

    d = describe_instructions(_HLO)
    assert d["fusion.3"] == ("transpose/copy", "(f32[4]{0}, f32[4]{0})", 2, False)
    # A plain dot is a library call (XLA:CPU runs it in Eigen, after its event).
    assert d["d"] == ("dot", "f32[]", 0, True) and d["add"] == ("add", "f32[4]{0}", 0, False)
    assert program_operations(_HLO) == {"fusion.3", "d"}


def test_device_check_short_run_writes_its_report(tmp_path, capsys):
    """``python -m bench.device_check --short``: the lent-GPU script's CPU smoke run."""
    from bench.device_check import main as device_check

    assert device_check(["--short", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["environment"]["jax"] == jax.__version__
    bench, parity = report["items"]
    assert [bench["status"], parity["status"]] == ["done", "done"]
    assert bench["arch"] == "lenet5" and bench["jax_ms"] > 0 and bench["torch_ms"] > 0
    assert parity["passed"] and 0 < parity["grads"] < 1e-8 and parity["eval"] < 1e-4
    md = (tmp_path / "device_check.md").read_text()
    assert "| lenet5 | 4 | 32 | fp32 |" in md and "| lenet5 | 2x32x32x1 (NHWC) |" in md
    assert md in capsys.readouterr().out


def test_device_check_budget_and_errors(tmp_path):
    """An item that raises is recorded and the run goes on; no item starts after the
    budget; the report names what was not reached."""
    from bench.device_check import Item, format_report, run_items

    items = [Item("parity", "lenet6", 2), Item("parity", "lenet5", 2),
             Item("bench", "resnet50", 2, 64)]
    rows = run_items(items, budget_s=1e-9, out=str(tmp_path), header={"machine": "test"})
    assert rows[0]["status"] == "error" and "lenet6" in rows[0]["error"]
    assert [r["status"] for r in rows[1:]] == ["not reached", "not reached"]
    md = format_report(rows, {"machine": "test"})
    assert "ERROR" in md and "Not reached within the budget (2)" in md
    assert json.loads((tmp_path / "device_check.json").read_text())["items"] == rows


def test_device_check_plan_covers_every_model():
    import jaxnets
    from bench.device_check import GRAD_PARITY, main as device_check, plan

    items = plan()
    parity = [i.arch for i in items if i.kind == "parity"]
    assert sorted(parity) == sorted(jaxnets.list_models()) and "transformer" in parity
    assert items[0].arch == "resnet50" and items[0].precision == "bf16"
    assert {i.arch for i in items if i.kind == "parity" and i.grads} == set(GRAD_PARITY)
    assert {i.arch for i in items if i.kind == "bench"} == {
        "lenet5", "resnet18_cifar", "resnet50", "vit_b_16", "transformer"}
    assert device_check(["--skip-parity", "--skip-bench"]) == 2


@pytest.mark.parametrize("module, argv", [
    ("porting.verify", ["--batch", "x"]),
    ("jaxnets.attention_maps", ["--head-fusion", "sum", "--out", "x.png"]),
    ("bench.train_step", ["--precision", "fp16"]),
    ("bench.profile_step", ["--steps", "x"]),
    ("bench.conv_ops", ["--nope"]),
    ("bench.device_check", ["--nope"]),
    ("bench.port", ["--runs", "x"]),
    ("bench.precision", ["--nope"]),
    ("bench.grad_conditioning", ["--nope"]),
])
def test_usage_errors_are_one_line(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"(see python -m {module.replace('_maps', '')} --help)" in err
