"""The methods: each registers itself (``rayssl.methods.base.register``) when imported here.

The registry feeds the CLI's choices, the config's method sections, the presets, the sweep's
default search spaces and the parametrized tests. Pure PyTorch (no Ray).
"""

from rayssl.methods.base import Method, MethodConfig, MethodSpec, get_method, method_names, register
from rayssl.methods import swav, mls, cdul  # noqa: F401,E402 - each module registers its method(s)

__all__ = ["Method", "MethodConfig", "MethodSpec", "get_method", "method_names", "register"]
