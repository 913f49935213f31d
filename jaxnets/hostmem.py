"""Host memory for XLA:CPU: keep freed blocks for reuse instead of unmapping them.

XLA:CPU allocates each execution's buffers with the C library's ``malloc``, from its
own threads: a train step's temporaries (552 MB for ``resnet18_cifar`` at batch 64)
and its outputs. glibc serves large blocks (above its threshold, 128 KB rising to at
most 32 MB, and anything over 64 MB asked for by a thread other than the main one)
with a fresh ``mmap`` and unmaps them when they are freed. So every step touches its
whole working set as new pages, each a page fault and a page zeroed by the kernel:
~148,000 a step for that ResNet-18, ~547,000 for ViT-B/16 at batch 8 (``getrusage``;
``tests/test_hostmem.py`` counts them). :func:`reuse_freed_memory` makes glibc keep
freed blocks in its heap and hand them out again: one arena for every thread, no
``mmap`` for large blocks, no trimming of the heap's top. Steps then fault almost no
pages (bench/README.md: 8-28% off the CPU train steps of ``bench.train_step``).

The price is memory: the heap never shrinks, and with compilations and a torch model
in the same process it fragments, so the resident size stays at a higher peak
(``bench.train_step``'s peak RSS: resnet50 at batch 8 from ~3.0 to 3.9-4.9 GiB,
vit_b_16 from 4.7 to 8.6 GiB; a ViT-B/16 step alone, 3.4 GiB either way).

The training and benchmark programs (``python -m train.finetune``, ``train.seq2seq``,
``bench.train_step``, ``bench.profile_step``, ``bench.conv_ops``) call it first thing
when jax will run on the CPU; ``JAXNETS_HOST_MALLOC=system`` in the environment turns
it off, ``JAXNETS_HOST_MALLOC=reuse`` forces it where an accelerator plugin is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

ENV_VAR = "JAXNETS_HOST_MALLOC"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def _backends_started() -> bool:
    """Whether jax has started its backends (and with them its threads)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a jax without it: cannot tell, assume not
        return False
    return bool(xla_bridge.backends_are_initialized())


def _accelerator_possible() -> bool:
    """Whether jax may pick a GPU or TPU in this process (before its backends start)."""
    import importlib.metadata
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:  # jax's GPU plugins (jax-cuda*-plugin, ROCm) register under this group
        return bool(importlib.metadata.entry_points(group="jax_plugins"))
    except Exception:  # noqa: BLE001 -- unreadable metadata: assume one may be there
        return True


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse, for XLA:CPU's buffers.

    Sets, with ``mallopt``: one arena (``M_ARENA_MAX`` 1), no ``mmap`` for large
    blocks (``M_MMAP_MAX`` 0) and no returning of the heap's free top to the kernel
    (``M_TRIM_THRESHOLD`` unlimited). A thread keeps the arena it first allocated
    from, so this must run before jax starts its backends (before the first array,
    ``jax.devices()`` or ``jax.distributed.initialize``); later it is not applied.

    Does nothing, and returns False, where the C library is not glibc, when
    ``JAXNETS_HOST_MALLOC=system`` is set, once jax's backends have started, or
    when jax may run on an accelerator (a GPU plugin or libtpu installed, unless
    ``JAX_PLATFORMS=cpu``): there device buffers are not ``malloc``'s, and one
    arena would only serialise the data loader's threads. ``JAXNETS_HOST_MALLOC=reuse``
    applies it there too.

    Returns:
        Whether the settings are in place (True again on a second call).
    """
    global _applied
    if _applied:
        return True
    choice = os.environ.get(ENV_VAR, "").lower()
    if choice == "system":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or _backends_started():
        return False
    if choice != "reuse" and _accelerator_possible():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. -1 as the trim threshold is the largest size_t.
    _applied = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                    (_M_TRIM_THRESHOLD, -1)))
    return _applied
