"""facegen_dist: distributed training of face and avatar generators."""

__version__ = "0.1.0"
