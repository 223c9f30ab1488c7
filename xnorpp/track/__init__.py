"""Tracking: wandb (rank 0, offline by default), ``results.json``, console progress."""

from .progress import Progress
from .results import read_results, write_results
from .wandb_tracker import MODES, WandbTracker

__all__ = ["MODES", "Progress", "WandbTracker", "read_results", "write_results"]
