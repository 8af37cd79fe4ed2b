"""Few-shot sinusoid regression (Finn et al. 2017, section 5.1).

Each task is ``y = amplitude * sin(x - phase)`` with the amplitude uniform in
``[0.1, 5.0]``, the phase uniform in ``[0, pi]`` and inputs uniform in
``[-5, 5]``. Sampling is pure ``jax.random``, so it runs on the device inside
a jitted training step.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sinusoid:
    """The sinusoid task family.

    Attributes:
      num_support: K, support points per task.
      num_query: query points per task.
    """

    num_support: int = 10
    num_query: int = 10
    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    input_range: tuple[float, float] = (-5.0, 5.0)
    dtype: jnp.dtype = jnp.float32

    metric = "mse"

    def __post_init__(self):
        # A negative count slices the wrong points into support and query, silently.
        if self.num_support < 1 or self.num_query < 1:
            raise ValueError(
                "num_support and num_query must be >= 1, "
                f"got {self.num_support} and {self.num_query}"
            )

    def sample(self, key: jax.Array, num_tasks: int) -> dict:
        """Samples a meta-batch of tasks.

        Returns:
          ``{"support": (x, y), "query": (x, y), "amplitude": a, "phase": p}``
          with ``x, y`` of shape ``(num_tasks, num_support or num_query, 1)``
          and ``a, p`` of shape ``(num_tasks,)``.
        """
        k_amp, k_phase, k_x = jax.random.split(key, 3)
        amplitude = jax.random.uniform(k_amp, (num_tasks,), self.dtype, *self.amplitude_range)
        phase = jax.random.uniform(k_phase, (num_tasks,), self.dtype, *self.phase_range)
        num_points = self.num_support + self.num_query
        x = jax.random.uniform(k_x, (num_tasks, num_points, 1), self.dtype, *self.input_range)
        y = self.ground_truth(amplitude, phase, x)
        return {
            "support": (x[:, : self.num_support], y[:, : self.num_support]),
            "query": (x[:, self.num_support :], y[:, self.num_support :]),
            "amplitude": amplitude,
            "phase": phase,
        }

    @staticmethod
    def ground_truth(amplitude: jax.Array, phase: jax.Array, x: jax.Array) -> jax.Array:
        """``amplitude * sin(x - phase)``; ``amplitude, phase``: ``(T,)``, ``x``: ``(T, n, 1)``."""
        return amplitude[:, None, None] * jnp.sin(x - phase[:, None, None])

    @staticmethod
    def loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean squared error."""
        return jnp.mean((predictions - targets) ** 2)

    @staticmethod
    def metrics(predictions: jax.Array, targets: jax.Array) -> dict:
        """``{"mse": scalar}`` of ``(..., 1)`` predictions and targets."""
        return {"mse": jnp.mean((predictions - targets) ** 2)}
