"""Pruning criteria. Each is a :class:`Criterion`: ``scores(...)`` returns a dict of
per-weight scores (lower = pruned first) keyed like ``model.named_parameters()``."""
from .at_init import SNIP, GraSP, SynFlow
from .base import Criterion, PruningStep
from .loss_model import OBD, QM, LossModel, Taylor
from .magnitude import Magnitude
from .random import Random, erk_densities
from .layerwise import SparseGPT, Wanda
from .woodfisher import WoodFisher, WoodTaylor

__all__ = ["Criterion", "PruningStep", "Magnitude", "Random", "erk_densities", "LossModel", "Taylor", "QM", "OBD",
           "WoodFisher", "WoodTaylor", "SparseGPT", "Wanda", "SNIP", "GraSP", "SynFlow"]
