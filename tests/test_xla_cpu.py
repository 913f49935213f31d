"""jaxnets.xla_cpu: XLA:CPU's convolutions are its own (Eigen), dots stay YNNPACK's."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Compiles a convolution and a matmul and reports which went to YNNPACK, and what
# eigen_convolutions() returned, called before jax starts ("early") or after ("late").
_SCRIPT = r"""
import json, os, sys
from jaxnets import xla_cpu
early = xla_cpu.eigen_convolutions() if sys.argv[1] == "early" else None
import jax, jax.numpy as jnp
jax.devices()
late = xla_cpu.eigen_convolutions() if sys.argv[1] == "late" else None

def ynn(f, *shapes):
    return "__ynn_fusion" in jax.jit(f).lower(*map(jnp.ones, shapes)).compile().as_text()

conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(json.dumps({"early": early, "late": late, "flags": os.environ.get("XLA_FLAGS", ""),
                  "conv_ynn": ynn(conv, (8, 32, 32, 64), (3, 3, 64, 64)),
                  "dot_ynn": ynn(jnp.matmul, (256, 256), (256, 256))}))
"""


def _env(**extra) -> dict:
    """The suite's environment without its XLA_FLAGS and conv opt-out, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNETS_XLA_CPU_CONV")}
    return {**base, "PYTHONPATH": str(ROOT), **extra}


def _run(when: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, when], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300,
                         env=_env(JAX_PLATFORMS="cpu", **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_convolutions_leave_ynnpack_and_dots_stay():
    default = _run("none")
    assert default["conv_ynn"] and default["dot_ynn"], default  # jaxlib's own default
    eigen = _run("early")
    assert eigen["early"] is True
    assert eigen["flags"] == ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,"
                              "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
    assert not eigen["conv_ynn"] and eigen["dot_ynn"], eigen


def test_opt_out_late_call_and_the_users_flags_are_respected():
    kept = _run("early", JAXNETS_XLA_CPU_CONV="ynn")
    assert kept["early"] is False and kept["conv_ynn"] and kept["flags"] == "", kept
    late = _run("late")
    assert late["late"] is False and late["conv_ynn"], late  # XLA has read its flags
    own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    users = _run("early", XLA_FLAGS=f"--xla_cpu_enable_fast_math=false {own}")
    assert users["early"] is False and users["conv_ynn"], users
    assert users["flags"] == f"--xla_cpu_enable_fast_math=false {own}"
    other = _run("early", XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert other["early"] is True and not other["conv_ynn"], other
    assert other["flags"].startswith("--xla_cpu_enable_fast_math=false --xla_cpu_experimental")


def test_not_applied_for_accelerators_or_a_jaxlib_without_the_flag(monkeypatch):
    from jaxnets import xla_cpu

    monkeypatch.setattr(xla_cpu, "_applied", False)
    monkeypatch.setattr(xla_cpu.hostmem, "_backends_started", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAXNETS_XLA_CPU_CONV", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert xla_cpu.eigen_convolutions() is False and "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert xla_cpu._jaxlib_knows_flag()
    # XLA would end the process on an unknown name: a jaxlib without one is left alone.
    monkeypatch.setattr(xla_cpu, "WITHOUT_CONVOLUTIONS",
                        (*xla_cpu.WITHOUT_CONVOLUTIONS, "LIBRARY_FUSION_TYPE_NO_SUCH_KIND"))
    assert not xla_cpu._jaxlib_knows_flag()
    assert xla_cpu.eigen_convolutions() is False and "XLA_FLAGS" not in os.environ


def test_the_programs_apply_it_before_jax_starts(tmp_path):
    script = ("import sys\nfrom bench import train_step\nfrom jaxnets import xla_cpu\n"
              "rc = train_step.main(sys.argv[1:])\nprint(rc, xla_cpu._applied)\n")
    out = subprocess.run([sys.executable, "-c", script, "--short", "--arch", "lenet5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_env())
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "0 True", (
        out.stdout + out.stderr)


def test_parity_with_xlas_own_convolutions():
    # The suite's other parity runs keep XLA's default (tests/conftest.py); the programs
    # run convolutions in Eigen. ResNet-18 (CIFAR) has every kind the step uses: the
    # 1-d kernel gradient, the 1x1 shortcut as a matmul, lax's forward and input gradient.
    script = ("import sys\nfrom jaxnets import xla_cpu\nassert xla_cpu.eigen_convolutions()\n"
              "from porting import verify\nsys.exit(verify.main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", script, "--arch", "resnet18_cifar", "--size",
                          "32", "32", "--batch", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=_env(JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("PASS: resnet18_cifar"), out.stdout
