"""Which layers a per-sample method attributes through (``layers=``), checked for support."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..exceptions import InputError, NoTrainableParametersError, UnsupportedModelError
from .base import LAYER_KINDS, kind_of, supported_names

__all__ = ["supported_modules"]


def supported_modules(
    model: nn.Module, layers: Sequence[str] | None = None, *,
    purpose: str = "in-run attribution", batchnorm: bool = False,
) -> dict[str, nn.Module]:
    """The layers whose trainable parameters are attributed, checked for support.

    With ``layers=None`` every module holding trainable parameters, all of which must be
    registered layer types (:data:`~dvl_ooc.layers.LAYER_KINDS`; else
    :class:`UnsupportedModelError` naming the first parameter outside such a layer). With
    ``layers`` given, those named modules only (each a supported layer with trainable
    parameters); other trainable parameters still train but are left out of the scores.
    Batch normalisation anywhere in the model is refused (it couples the samples of a batch),
    unless ``batchnorm=True``: then BatchNorm layers count as supported layers and are returned
    too (a caller that handles their batch coupling, e.g. :class:`~dvl_ooc.inrun.InRunShapley`,
    attributes their affine parameters). ``purpose`` names the caller in messages.
    """
    named = dict(model.named_modules())
    bn_type = nn.modules.batchnorm._BatchNorm
    kinds = tuple(LAYER_KINDS) + ((bn_type,) if batchnorm else ())
    names_ok = supported_names() + (" and BatchNorm" if batchnorm else "")
    if layers is None:
        names = []
        for name, mod in named.items():
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(mod, kinds):
                pname = f"{name}.{own[0][0]}" if name else own[0][0]
                raise UnsupportedModelError(
                    f"parameter {pname!r} belongs to a {type(mod).__name__}; {purpose} "
                    f"supports trainable parameters only in {names_ok} layers "
                    "(freeze the others with requires_grad_(False), or pass layers=[...] to "
                    "attribute through some layers only)"
                )
            names.append(name)
    else:
        if isinstance(layers, str) or len(layers) == 0:
            raise InputError("layers must be a non-empty list of module names (or None)")
        names = list(dict.fromkeys(layers))
        for name in names:
            if name not in named:
                raise InputError(f"no module named {name!r} in the model")
            mod = named[name]
            if not isinstance(mod, kinds):
                raise UnsupportedModelError(
                    f"module {name!r} is a {type(mod).__name__}; {purpose} supports "
                    f"{names_ok} layers"
                )
            if not any(p.requires_grad for p in mod.parameters(recurse=False)):
                raise InputError(f"layer {name!r} has no trainable parameters")
    out: dict[str, nn.Module] = {}
    for name in names:
        mod = named[name]
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if len(own) != len(list(mod.parameters(recurse=False))):
            raise UnsupportedModelError(
                f"layer {name!r} has both trainable and frozen parameters; freeze or train "
                "the whole layer"
            )
        if not isinstance(mod, bn_type):
            kind_of(mod, name).check(mod, name)
        out[name] = mod
    if not out:
        raise NoTrainableParametersError("the model has no trainable parameters")
    for mod in model.modules():
        if isinstance(mod, bn_type) and not batchnorm:  # batch statistics in training
            raise UnsupportedModelError(
                f"{type(mod).__name__} couples the samples of a batch; per-sample gradients "
                "are not defined (use GroupNorm/LayerNorm without affine, or none)"
            )
    return out
