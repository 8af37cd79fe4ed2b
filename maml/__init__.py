"""MAML in JAX: differentiate through gradient descent.

The public API is pure functions over parameter pytrees: ``maml.core`` (the
algorithm), ``maml.second_order`` (Hessian-vector products and friends),
``maml.imaml`` (implicit MAML); models in ``maml.models``, task families in
``maml.tasks``.
"""

from maml import imaml, second_order, tasks
from maml.core import adapt, batched_meta_loss, meta_loss, sgd_step
from maml.imaml import batched_imaml_loss_and_grad, imaml_loss_and_grad
from maml.models import MLP, ConvNet, functional
from maml.second_order import hessian, hvp
from maml.tasks import sinusoid

__all__ = [
    "MLP",
    "ConvNet",
    "adapt",
    "batched_imaml_loss_and_grad",
    "batched_meta_loss",
    "functional",
    "hessian",
    "hvp",
    "imaml",
    "imaml_loss_and_grad",
    "meta_loss",
    "second_order",
    "sgd_step",
    "sinusoid",
    "tasks",
]
