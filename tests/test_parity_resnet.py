"""jaxnets vs torchvision/torch, fp32: the foundation models.

Each case ports a randomly initialised torch model (BatchNorm statistics and
affine terms randomised) and compares eval logits, train-mode logits and
BatchNorm statistics (<= 1e-4) and the gradients of every parameter in eval
and train mode (float64 on both sides, <= 1e-4 relative per tensor; see
porting/parity.py for why fp32 gradients are reported, not judged).
"""

import pytest

from porting.parity import run_parity

CASES = [
    ("lenet5", None, 2, {}),
    ("mlp", None, 3, {}),
    ("resnet18_cifar", (32, 32), 2, {}),
    ("resnet18_cifar", (40, 48), 2, {}),
    ("resnet18", (160, 192), 2, {}),
    ("resnet34", (160, 192), 2, {}),
    ("resnet50", (160, 192), 2, {}),
    ("resnext50_32x4d", (160, 192), 2, {}),
    ("wide_resnet50_2", (160, 192), 2, {}),
    ("resnet101", (96, 128), 2, {}),
    ("resnet152", (96, 128), 2, {}),
    ("resnext101_32x8d", (96, 128), 2, {}),
    ("resnext101_64x4d", (96, 128), 2, {}),
    ("wide_resnet101_2", (96, 128), 2, {}),
    ("resnet50", (72, 88), 2, {"replace_stride_with_dilation": [False, True, True]}),
    ("resnet18", (64, 80), 2, {"zero_init_residual": True}),
]


@pytest.mark.parametrize("arch,size,batch,overrides", CASES,
                         ids=[f"{a}-{s[0]}x{s[1]}" if s else a for a, s, _, _ in CASES])
def test_parity_with_torch(arch, size, batch, overrides):
    result = run_parity(arch, size=size, batch=batch, overrides=overrides,
                        fp32_grads=arch in ("lenet5", "mlp"))
    assert result.passed, f"\n{result.table()}"
    names = [q.name for q in result.quantities]
    assert "eval logits" in names and "train logits" in names
    assert any(n.startswith("grads fp64") for n in names)
