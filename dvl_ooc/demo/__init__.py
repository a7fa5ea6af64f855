"""The demo (mislabelled digits, end to end), its networks and its data sets."""

from .run import run_demo

__all__ = ["run_demo"]
