"""Shared test settings: deterministic CPU runs with full fp32 precision."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the run, made by the first process that loads this file
# (pytest, or xdist's controller) and inherited by the xdist workers and by every
# subprocess a test starts: the CLI, multi-device and multi-process tests compile the
# same small training steps again and again (measured: 17% off those tests' time).
# A fresh folder per run, removed at its end; a cache the user set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxnets-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# Under pytest-xdist each worker gets its share of the cores for torch's (OpenMP) intra-op
# threads, and so do the subprocesses its tests start: by default every worker's torch
# uses all cores, and its spinning OpenMP threads then take turns with the other workers'
# XLA and torch threads. Measured with `-n 2` on 2 cores: tests/test_parity_resnet.py
# 4 min 38 s with torch's default, 3 min 39 s with one thread per worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The training programs make glibc keep freed memory for reuse (jaxnets/hostmem.py), so
# a process stays at its peak resident size. The suite's processes hold multi-GB models
# one after another, and a test that calls a program's main() in-process would switch
# it on for the rest of its worker depending on test order: the suite keeps glibc's
# default (tests/test_hostmem.py sets the variable itself).
os.environ.setdefault("JAXNETS_HOST_MALLOC", "system")

# numpy asks for transparent huge pages for big arrays; on a machine whose memory is
# fragmented (this one, after a few GB-sized models) the kernel then compacts memory
# on first touch: a fresh 400 MB transposed copy was measured at 1.35 s instead of 0.36 s.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
if "numpy" in sys.modules:  # imported before this file: switch it off directly
    _np = sys.modules["numpy"]
    _set = getattr(getattr(getattr(_np, "_core", None) or getattr(_np, "core", None),
                           "multiarray", None), "_set_madvise_hugepage", None)
    if _set is not None:
        _set(os.environ["NUMPY_MADVISE_HUGEPAGE"] != "0")

# The training and benchmark programs move XLA:CPU's convolutions off YNNPACK
# (jaxnets/xla_cpu.py). The suite keeps XLA's default, as for the heap above: parity's
# float64 gradients are 4-7x slower in XLA's own convolutions, and a program's main()
# called in-process would switch a worker over depending on test order.
# tests/test_xla_cpu.py unsets the variable for its subprocesses (parity included).
os.environ.setdefault("JAXNETS_XLA_CPU_CONV", "ynn")

import jax  # noqa: E402

# Parity is judged at fp32 round-off: never let a backend pick a faster,
# lower-precision matmul/conv algorithm (TF32 on GPU).
jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if _WORKERS > 1:  # in case torch was imported before this file read OMP_NUM_THREADS
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
except ImportError:  # the torch-free tests still run
    pass


import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


@pytest.fixture(autouse=True)
def _release_memory_after_big_tests(request):
    """Keep one long pytest process from growing to the machine's memory.

    The parity tests build models of up to 600M parameters one after another;
    without this the process keeps compiled executables and freed-but-unreturned
    heap from all of them (an earlier full run was OOM-killed at 24 GB).
    """
    yield
    if request.node.module.__name__.split(".")[-1] in (
            "test_parity_resnet", "test_parity_classic", "test_vit", "test_models_roundtrip",
            "test_attention_maps", "test_pretrained", "test_accelerator_path"):
        gc.collect()
        jax.clear_caches()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)


# Tests that hold several GB at their peak (full-size ViT-L/H, float64 VGG
# gradients). Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test
# command) they all run on one worker, one after another, so two of them never
# share the machine's memory; everything else is spread over the workers.
BIG_MEMORY = (
    "test_vit.py::test_parity_large_outputs",
    "test_vit.py::test_parity_with_float64_gradients",
    "test_vit.py::test_vit_b_16_at_384",
)


def _big_memory(nodeid: str) -> bool:
    vgg_grads = "test_parity_with_torchvision[vgg" in nodeid and "-grads" in nodeid
    return vgg_grads or any(tag in nodeid for tag in BIG_MEMORY)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _big_memory(item.nodeid):
            item.add_marker(pytest.mark.xdist_group("big-memory"))
