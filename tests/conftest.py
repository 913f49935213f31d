"""Shared test settings: deterministic CPU runs with full fp32 precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity is judged at fp32 round-off: never let a backend pick a faster,
# lower-precision matmul/conv algorithm (TF32 on GPU).
jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
except ImportError:  # the torch-free tests still run
    pass
