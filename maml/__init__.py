"""MAML in JAX: differentiate through gradient descent.

The public API is pure functions over parameter pytrees; see ``maml.core``.
"""

from maml.core import adapt, batched_meta_loss, meta_loss, sgd_step
from maml.models import MLP, functional

__all__ = ["MLP", "adapt", "batched_meta_loss", "functional", "meta_loss", "sgd_step"]
