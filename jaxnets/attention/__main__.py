"""``python -m jaxnets.attention --arch vit_b_16 --image PATH --out FILE.png``: the
attention-map tool, :mod:`jaxnets.attention_maps`.

A package's ``__main__`` (not ``if __name__ == "__main__"`` in the module): the
module is imported with the ``jaxnets`` package, and runpy warns when a module
already imported is run as ``__main__``.
"""

import sys

from jaxnets.attention_maps import main

sys.exit(main())
