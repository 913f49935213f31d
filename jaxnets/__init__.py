"""jaxnets: the classic networks of deep learning as Flax NNX modules.

>>> import jaxnets
>>> model = jaxnets.create_model("resnet50", num_classes=10)
"""

from jaxnets.registry import (ModelSpec, UnknownModelError, create_model, get_spec, list_models,
                              register_model)

# Importing a family module registers its models.
from jaxnets import alexnet as _alexnet  # noqa: F401,E402
from jaxnets import googlenet as _googlenet  # noqa: F401,E402
from jaxnets import inception as _inception  # noqa: F401,E402
from jaxnets import lenet as _lenet  # noqa: F401,E402
from jaxnets import resnet as _resnet  # noqa: F401,E402
from jaxnets import transformer as _transformer  # noqa: F401,E402
from jaxnets import vgg as _vgg  # noqa: F401,E402
from jaxnets import vit as _vit  # noqa: F401,E402

__all__ = ["ModelSpec", "UnknownModelError", "create_model", "get_spec", "list_models",
           "register_model"]
__version__ = "0.1.0"
