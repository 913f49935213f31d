"""For every registered model: exact torch -> flax -> torch round trip, and
the summary's parameter total equals torch's."""

import numpy as np
import pytest
import torch

import jaxnets
from jaxnets.summary import summarize
from porting import load_torch_state_dict, to_torch_state_dict
from porting.parity import randomize_torch_model
from porting.pretrained import build_abstract
from porting.reference import build_torch_model


@pytest.mark.parametrize("arch", jaxnets.list_models())
def test_roundtrip_bit_exact_and_param_count(arch):
    torch.manual_seed(0)
    tmodel = build_torch_model(arch)
    randomize_torch_model(tmodel, seed=1)
    sd = tmodel.state_dict()
    # Shape-only build: the load fills every variable, so nothing is initialised twice.
    model = build_abstract(arch)
    load_torch_state_dict(model, sd)
    back = to_torch_state_dict(model)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        b = back[k]
        assert b.shape == tuple(v.shape), k
        assert b.dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(b, v.numpy(), err_msg=k)
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    _, total = summarize(arch)
    assert total == sum(p.numel() for p in tmodel.parameters())
