"""For every registered model: torch's keys and shapes, the parameter count, and
the bit-exact torch -> flax -> torch round trip.

The key/shape/count checks need no values: the torch model is built on the
meta device and the jaxnets model shape-only. The round trip with values is
part of every parity run (``porting.parity.compare_round_trip``, the first
row of each parity table), so it is checked here that every registered model
has one; models without a parity run (the sequence models) get their own.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxnets
from jaxnets.summary import summarize
from porting import load_torch_state_dict
from porting.parity import compare_round_trip
from porting.pretrained import build_abstract
from porting.reference import build_torch_model
from porting.rules import rules_for, torch_key
from porting.state_dict import flax_variables

sys.path.insert(0, str(Path(__file__).parent))


@pytest.mark.parametrize("arch", jaxnets.list_models())
def test_torch_keys_shapes_and_param_count(arch):
    with torch.device("meta"):
        tmodel = build_torch_model(arch)
    want = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    model = build_abstract(arch)
    rules = rules_for(model)
    ours = {}
    for path, var in flax_variables(model).items():
        key, layout = torch_key(path, rules)
        ours[key] = layout.torch_shape(tuple(var.get_value().shape))
    assert ours == want
    _, total = summarize(arch)
    assert total == sum(p.numel() for p in tmodel.parameters())


def _parity_archs() -> set[str]:
    import test_parity_classic
    import test_parity_resnet
    import test_vit

    archs = {case[0] for case in test_parity_resnet.CASES + test_parity_classic.CASES}
    return archs | set(test_vit.PARITY_ARCHS)


SEQUENCE_MODELS = jaxnets.list_models(kind="sequence")


def test_every_model_has_a_round_trip():
    assert _parity_archs() | set(SEQUENCE_MODELS) == set(jaxnets.list_models())


@pytest.mark.parametrize("arch", SEQUENCE_MODELS)
def test_round_trip_of_models_without_a_parity_run(arch):
    torch.manual_seed(0)
    tmodel = build_torch_model(arch)
    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
          for k, v in tmodel.state_dict().items()}  # no zeros or ones: every tensor distinct
    tmodel.load_state_dict(sd)
    model = build_abstract(arch)
    load_torch_state_dict(model, sd)
    q = compare_round_trip(model, tmodel.state_dict())
    assert q.passed and q.note == f"{len(sd)} tensors bit-exact", (q.failed, q.note)
    # The check can fail: a changed tensor is named.
    model_vars = flax_variables(model)
    first = next(iter(model_vars))
    model_vars[first].set_value(model_vars[first].get_value() + 1)
    q = compare_round_trip(model, tmodel.state_dict())
    assert not q.passed and len(q.failed) == 1 and q.max_abs == pytest.approx(1.0)
