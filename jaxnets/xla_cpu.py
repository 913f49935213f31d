"""XLA:CPU settings for the training and benchmark programs, applied before jax starts.

:func:`eigen_convolutions` keeps XLA:CPU's convolutions out of YNNPACK. jaxlib 0.10
hands dots, reductions and convolutions to the YNNPACK library by default (its
``--xla_cpu_experimental_ynn_fusion_type`` is ``DOT, INDIVIDUAL_DOT, REDUCE,
INDIVIDUAL_CONVOLUTION``: a ResNet-18 train step compiles to the same program with
those four named). YNNPACK's convolutions are the slower ones on the development
machine (2 AVX-512 cores): a 3x3, 64-channel convolution over 64x32x32 maps took
49 ms forward and 49 ms for its input gradient, against 28 and 28 ms for XLA's own
(Eigen) convolution, and 22 ms for torch's forward pass; ResNet-50's 56x56 3x3
convolutions 18.9 against 10.8 ms (``python -m bench.conv_ops``, bench/README.md).
From 128 channels up the two are about equal, and at 7x7 maps YNNPACK's is the
faster; in the train steps the 64-channel stages decide (ResNet-18 CIFAR 4-6%
faster, inference 11-19% across the ResNets and GoogLeNet). Dots and reductions
stay YNNPACK's, as XLA has them. In float64
XLA's own convolutions are the slower, 4-7x: ``porting.verify`` and the test suite
(parity's float64 gradients) keep the default.

:func:`prepare_cpu` is what the programs call first thing: this and
:func:`jaxnets.hostmem.reuse_freed_memory`. ``JAXNETS_XLA_CPU_CONV=ynn`` keeps
XLA's default; a ``--xla_cpu_experimental_ynn_fusion_type`` the user put in
``XLA_FLAGS`` is left as it is.
"""

from __future__ import annotations

import glob
import mmap
import os

from jaxnets import hostmem

ENV_VAR = "JAXNETS_XLA_CPU_CONV"
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# XLA's default list (jaxlib 0.10) without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
WITHOUT_CONVOLUTIONS = ("LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                        "LIBRARY_FUSION_TYPE_REDUCE")

_applied = False


def _jaxlib_knows_flag() -> bool:
    """Whether the installed jaxlib's XLA has the flag and its values.

    XLA ends the process on an unknown flag in ``XLA_FLAGS``, so the names are
    looked up in jaxlib's shared libraries first (a few ms: the library is mapped,
    not read).
    """
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.origin:
        return False
    wanted = [FLAG[2:].encode(), *(v.encode() for v in WITHOUT_CONVOLUTIONS)]
    for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so*"))):
        try:
            if os.path.getsize(path) < 1 << 20:  # the small Python extension stubs
                continue
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if all(m.find(w) >= 0 for w in wanted):
                    return True
        except (OSError, ValueError):
            continue
    return False


def eigen_convolutions() -> bool:
    """Append ``--xla_cpu_experimental_ynn_fusion_type=<dots and reductions>`` to
    ``XLA_FLAGS``, so that XLA:CPU computes convolutions itself (Eigen), not by YNNPACK.

    XLA reads ``XLA_FLAGS`` when its backends start, so this must run before (before
    the first array or ``jax.devices()``); later it is not applied. Not applied
    either where jax may run on an accelerator (the flag is XLA:CPU's; see
    :func:`jaxnets.hostmem.reuse_freed_memory` for how that is told), when
    ``JAXNETS_XLA_CPU_CONV=ynn`` is set, when ``XLA_FLAGS`` already sets the flag
    (it is left as it is), or when the installed jaxlib does not have it.

    Returns:
        Whether the flag is in place: applied now or before, or already in
        ``XLA_FLAGS`` with this value (a subprocess of a program that applied it).
    """
    global _applied
    if _applied:
        return True
    flags = os.environ.get("XLA_FLAGS", "")
    setting = f"{FLAG}={','.join(WITHOUT_CONVOLUTIONS)}"
    if FLAG[2:] in flags:  # the user's (or a parent process's) choice stands
        return setting in flags.split()
    if (os.environ.get(ENV_VAR, "").lower() == "ynn" or hostmem._backends_started()
            or hostmem._accelerator_possible() or not _jaxlib_knows_flag()):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {setting}".strip()
    _applied = True
    return True


def prepare_cpu() -> None:
    """The programs' XLA:CPU settings, before jax starts its backends: freed host
    memory kept for reuse (:mod:`jaxnets.hostmem`) and :func:`eigen_convolutions`."""
    hostmem.reuse_freed_memory()
    eigen_convolutions()
