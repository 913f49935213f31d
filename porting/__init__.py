"""torch <-> flax porting: state_dicts in, state_dicts out, checked against PyTorch."""

from porting.rules import Layout, Rule, register_rules, rules_for
from porting.state_dict import (LoadReport, PortingError, flax_to_torch, load_torch_state_dict,
                                to_torch_state_dict, to_torch_tensor)

from porting.hub import DownloadError
from porting.pretrained import from_torchvision, load_torchvision
from porting.weights import Transforms, UnknownWeightsError, Weights, get_weights, list_weights

__all__ = ["Layout", "Rule", "register_rules", "rules_for", "LoadReport", "PortingError",
           "flax_to_torch", "load_torch_state_dict", "to_torch_state_dict", "to_torch_tensor",
           "DownloadError", "from_torchvision", "load_torchvision", "Transforms",
           "UnknownWeightsError", "Weights", "get_weights", "list_weights"]
