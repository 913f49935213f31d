"""jaxnets vs torchvision/torch, fp32: the foundation models.

Each case ports a randomly initialised torch model (BatchNorm statistics and
affine terms randomised), checks the export back to torch bit for bit, and
compares eval logits, train-mode logits and BatchNorm statistics (<= 1e-4) and
the gradients of every parameter (float64 on both sides, <= 1e-4 relative per
tensor; see porting/parity.py for why fp32 gradients are reported, not judged).

Gradients are compared with BatchNorm in train mode (batch statistics: every
parameter gets a gradient) for every model, and also in eval mode (running
statistics, as when fine-tuning with frozen statistics) for the models that
stand for each block type (``BOTH``); the deeper models are more rows of the
same stage table, and a float64 gradient program of a 101-layer network costs
~10 s to compile per mode on 2 cores.
"""

import pytest

from porting.parity import run_parity

BOTH = ("eval", "train")
TRAIN = ("train",)

# (arch, size, batch, overrides, gradient modes)
CASES = [
    # Batch 3: 2352 output positions in the first convolution, enough for the CPU's
    # one-channel form (jaxnets.layers._conv_taps) and 1-d kernel gradient in fp32.
    ("lenet5", None, 3, {}, BOTH),
    ("mlp", None, 3, {}, BOTH),
    ("resnet18_cifar", (32, 32), 2, {}, BOTH),
    ("resnet18_cifar", (40, 48), 2, {}, TRAIN),
    ("resnet18", (160, 192), 2, {}, BOTH),
    ("resnet34", (160, 192), 2, {}, TRAIN),
    ("resnet50", (160, 192), 2, {}, BOTH),
    ("resnext50_32x4d", (128, 96), 2, {}, TRAIN),
    ("wide_resnet50_2", (128, 96), 2, {}, TRAIN),
    ("resnet101", (64, 96), 2, {}, TRAIN),
    ("resnet152", (64, 96), 2, {}, TRAIN),
    ("resnext101_32x8d", (64, 96), 2, {}, TRAIN),
    ("resnext101_64x4d", (64, 96), 2, {}, TRAIN),
    ("wide_resnet101_2", (64, 96), 2, {}, TRAIN),
    ("resnet50", (72, 88), 2, {"replace_stride_with_dilation": [False, True, True]}, TRAIN),
    ("resnet18", (64, 80), 2, {"zero_init_residual": True}, TRAIN),
]


# The 101/152-layer networks compile each distinct residual block once (jit="blocks"):
# jit of the whole network compiles every copy, and that compile is most of a case's time
# (one run each, 64x96: ResNet-152 45 -> 25 s, ResNeXt-101 32x8d 36 -> 25 s, ResNet-101
# 27 -> 22 s); for 50 layers and fewer, jit of the whole network is faster (ResNet-50
# 23 against 29 s); op by op is slower than both (ResNet-101: 54 s).
DEEP = {"resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"}


@pytest.mark.parametrize("arch,size,batch,overrides,modes", CASES,
                         ids=[f"{a}-{s[0]}x{s[1]}" if s else a for a, s, *_ in CASES])
def test_parity_with_torch(arch, size, batch, overrides, modes):
    result = run_parity(arch, size=size, batch=batch, overrides=overrides, grads=modes,
                        fp32_grads=arch in ("lenet5", "mlp"),
                        jit="blocks" if arch in DEEP else True)
    assert result.passed, f"\n{result.table()}"
    names = [q.name for q in result.quantities]
    assert "eval logits" in names and "train logits" in names
    assert names[0] == "round trip torch->jax->torch"
    grads = [n for n in names if n.startswith("grads fp64")]
    assert len(grads) == len(modes) and all(m in g for m, g in zip(modes, grads)), names


def test_deep_cases_are_rows_of_the_table():
    assert DEEP <= {arch for arch, *_ in CASES}
