"""torch <-> flax porting: state_dicts in, state_dicts out, checked against PyTorch."""

from porting.rules import Layout, Rule, register_rules, rules_for
from porting.state_dict import (LoadReport, PortingError, flax_to_torch, load_torch_state_dict,
                                to_torch_state_dict)

__all__ = ["Layout", "Rule", "register_rules", "rules_for", "LoadReport", "PortingError",
           "flax_to_torch", "load_torch_state_dict", "to_torch_state_dict"]
