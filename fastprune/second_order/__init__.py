"""Second-order numerics: the blocked inverse of the damped empirical Fisher
(:mod:`.inverse`, batched Cholesky or the exact low-rank form) and the Optimal Brain
Surgeon saliencies and weight updates built on it (:mod:`.obs`)."""
from .inverse import FisherInverse
from .obs import obs_scores, obs_update

__all__ = ["FisherInverse", "obs_scores", "obs_update"]
