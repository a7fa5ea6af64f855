"""Recipes: whole jobs built from the toolkit's parts (``dvl-ooc images``)."""

from .images import METHODS, ImagesJob, run_images

__all__ = ["METHODS", "ImagesJob", "run_images"]
