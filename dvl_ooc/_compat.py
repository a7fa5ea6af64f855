"""Deprecated names, in one place: moved modules and renamed keyword arguments.

Everything listed here keeps working for one release and emits a ``DeprecationWarning`` that
names the replacement.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MOVED_MODULES",
    "deprecated_alias",
    "install_module_aliases",
    "renamed_arguments",
    "renamed_kwargs",
]

#: old module path -> new module path
MOVED_MODULES: dict[str, str] = {
    "dvl_ooc.nets": "dvl_ooc.demo.nets",
    "dvl_ooc.datasets": "dvl_ooc.demo.datasets",
    "dvl_ooc.imagefolder": "dvl_ooc.data.imagefolder",
    "dvl_ooc.tracin": "dvl_ooc.influence.tracin",
    "dvl_ooc.valuation.kernels": "dvl_ooc.valuation.tasks",
    "dvl_ooc.influence._lowrank": "dvl_ooc.influence.sketch",
}


def _warn(msg: str, stacklevel: int = 3) -> None:
    warnings.warn(msg, DeprecationWarning, stacklevel=stacklevel)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:  # the target module is already executed
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        _warn(f"{fullname} moved to {new}; import it from there", stacklevel=4)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install_module_aliases() -> None:
    """Let ``import dvl_ooc.<old>`` load the moved module (with a ``DeprecationWarning``)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def renamed_kwargs(owner: str, kwargs: dict[str, Any], renames: Mapping[str, str]) -> None:
    """Move deprecated keyword arguments in ``kwargs`` to their new names, in place, with a
    ``DeprecationWarning``; passing both the old and the new name is an error."""
    from .exceptions import InputError

    for old, new in renames.items():
        if old in kwargs:
            if new in kwargs:
                raise InputError(f"{owner}: pass {new}= only ({old}= is its deprecated name)")
            _warn(f"{owner}: {old}= is deprecated, use {new}=", stacklevel=4)
            kwargs[new] = kwargs.pop(old)


def renamed_arguments(
    init: Any, deprecated: Mapping[str, Any], renames: Mapping[str, str], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Resolve deprecated keyword names of a constructor (``**deprecated`` catches them).

    ``init`` is the constructor defining the new names, ``given`` the values it received for
    them. Returns ``new name -> value`` for the arguments passed under their old name (with a
    ``DeprecationWarning``); an unknown keyword raises ``TypeError`` and passing both the old
    and the (non-default) new name raises :class:`~dvl_ooc.exceptions.InputError`.
    """
    owner = init.__qualname__.rpartition(".")[0] or init.__qualname__
    unknown = sorted(set(deprecated) - set(renames))
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if not deprecated:
        return {}
    params = inspect.signature(init).parameters
    kw: dict[str, Any] = {
        new: given[new] for old, new in renames.items()
        if old in deprecated and given[new] != params[new].default
    }
    kw.update(deprecated)
    renamed_kwargs(owner, kw, renames)
    return {new: kw[new] for old, new in renames.items() if old in deprecated}


def deprecated_alias(new: str, *, owner: str = "") -> property:
    """A read-only attribute ``old`` that returns ``self.<new>`` with a ``DeprecationWarning``."""

    def get(self: Any) -> Any:
        _warn(f"{owner or type(self).__name__}: this attribute is deprecated, use .{new}")
        return getattr(self, new)

    return property(get)
