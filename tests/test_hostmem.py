"""jaxnets.hostmem: XLA:CPU's freed buffers are reused, not page-faulted in again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Calls a jitted function whose 64 MB output is freed after each call and counts the
# page faults of a call: the fewest of ten, after eight calls that let the heap grow
# to its working size (five did in a trial; an odd later call may still grow it, and
# under glibc's default every call faults its whole output in).
_SCRIPT = r"""
import json, resource, sys
from jaxnets import hostmem
early = hostmem.reuse_freed_memory() if sys.argv[1] == "early" else None
import jax, jax.numpy as jnp
x = jnp.ones((1 << 24,), jnp.float32)
late = hostmem.reuse_freed_memory() if sys.argv[1] == "late" else None
f = jax.jit(lambda a: a * 2)
for _ in range(8):
    f(x).block_until_ready()
counts = []
for _ in range(10):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
faults = min(counts)
print(json.dumps({"early": early, "late": late, "faults": faults}))
"""


def _run(when: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, when], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_xla_buffers_are_reused_without_page_faults():
    pages = (1 << 24) * 4 // os.sysconf("SC_PAGE_SIZE")  # one output's pages
    system = _run("early", JAXNETS_HOST_MALLOC="system")
    assert system["early"] is False  # the opt-out is honoured
    # glibc's default: each call's output is a fresh mmap, faulted in page by page.
    assert system["faults"] > pages / 2, system
    reused = _run("early", JAXNETS_HOST_MALLOC="")
    assert reused["early"] is True
    assert reused["faults"] < pages / 20, (reused, system)
    # Once jax has started its threads the setting would not reach them: not applied.
    late = _run("late", JAXNETS_HOST_MALLOC="")
    assert late["late"] is False
    assert late["faults"] > pages / 2, late


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_finetune_applies_it_before_jax_starts(tmp_path):
    # The program's imports must not start jax's backends before main() asks for the
    # setting, or it is silently not applied.
    script = ("import sys\nfrom train import finetune\nfrom jaxnets import hostmem\n"
              "rc = finetune.main(sys.argv[1:])\nprint(rc, hostmem._applied)\n")
    args = ["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--no-progress",
            "--steps", "2", "--batch-size", "16", "--output-dir", str(tmp_path / "run")]
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JAXNETS_HOST_MALLOC": ""})
    assert out.stdout.strip().splitlines()[-1] == "0 True", out.stdout + out.stderr


def test_left_alone_where_jax_may_run_on_an_accelerator(monkeypatch):
    from jaxnets import hostmem

    monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert hostmem._accelerator_possible()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not hostmem._accelerator_possible()
