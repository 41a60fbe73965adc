"""The per-sample statistics engine: one forward and one backward per batch give the
empirical/MC/true Fisher diagonal, Fisher blocks, mean gradients and raw per-sample
gradients, without holding N x params gradients.

- :mod:`.plan` decides, per parameter, the exact formula or the torch.func fallback;
- :mod:`.capture` records layer inputs and output gradients during the passes;
- :mod:`.formulas` holds the exact per-sample gradient formula of each layer type;
- :mod:`.losses` the per-sample losses and the label draws of each Fisher kind;
- :mod:`.fisher` (``fisher_diag``) and :mod:`.blocks` (``FisherBlocks``,
  ``per_sample_gradients``) are the entry points.
"""
from .blocks import FisherBlocks, per_sample_gradients
from .fisher import FisherCollector, fisher_diag

__all__ = ["fisher_diag", "FisherCollector", "FisherBlocks", "per_sample_gradients"]
