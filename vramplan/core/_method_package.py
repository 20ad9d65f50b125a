"""Lets a method's package be called as its function: `vramplan.simulate(spec, setup)`.

vramplan exports `simulate`, `profile` and `plan` by the names of their packages, and loads those
packages on first use so that `import vramplan` (and `vramplan estimate`) stay light. Python binds
a subpackage to its parent's attribute when it is imported, which would shadow a function of the
same name; making the package module callable keeps both `vramplan.simulate(...)` and
`from vramplan.simulate import Trace` working whichever is touched first.
"""
from __future__ import annotations

import sys
import types


def make_callable(package_name: str, function) -> None:
    """Calling the package `package_name` calls `function` (its docstring shows in help())."""

    class MethodPackage(types.ModuleType):
        __doc__ = function.__doc__

        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[package_name].__class__ = MethodPackage
