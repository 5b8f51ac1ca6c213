"""Functional forms of the layers: ``torch.autograd.Function`` s with hand-written kernels.

Every kernel module of :mod:`kronlayers.registry` is imported and the names in its
``__all__`` are exported here (e.g. ``kronecker_linear``, ``cp_linear_flops``,
``CPConv2dFunction``). All Functions follow one calling convention,
``Function.apply(input, bias, config, *factors)`` (see :mod:`kronlayers.functional._function`).
"""

from importlib import import_module

from ..registry import LAYERS

__all__: list[str] = []
for _entry in LAYERS:
    _kernel = import_module(_entry.functional)
    for _name in _kernel.__all__:
        if _name not in __all__:  # two layers may share one kernel module
            globals()[_name] = getattr(_kernel, _name)
            __all__.append(_name)
del _entry, _kernel, _name
