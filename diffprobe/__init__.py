"""diffprobe: pretrained diffusion U-Nets as image classifiers (frozen features + light heads)."""

from .backbones import Backbone, BlockInfo, load_backbone
from .errors import DiffprobeError

__version__ = "0.1.0"

__all__ = ["Backbone", "BlockInfo", "DiffprobeError", "load_backbone", "__version__"]
