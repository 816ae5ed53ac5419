"""The hard-concrete distribution: a gate in [0, 1] that is exactly 0 or 1 with non-zero probability.

Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization" (ICLR 2018), eqs. 9-12,
with the constants used by CoFi and Sheared-LLaMA (docs/method.md#section-3)::

    u ~ U(eps, 1-eps)
    s = sigmoid((log u - log(1-u) + log_alpha) / beta)          concrete sample in (0, 1)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)                  stretched to (gamma, zeta), then clipped
    P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))    = sigmoid(log_alpha + 1.599)

The functions here are pure maths on tensors of ``log_alpha`` (any shape); :mod:`tailored.core.gates` holds the
parameters.
"""

from __future__ import annotations

import math

import torch

GAMMA = -0.1
"""Lower stretch limit."""
ZETA = 1.1
"""Upper stretch limit."""
BETA = 2.0 / 3.0
"""Temperature."""
EPS = 1e-6
"""Keeps the uniform noise away from 0 and 1."""
DETERMINISTIC_SHARPNESS = 0.8
"""Sheared-LLaMA's factor in the deterministic gate ``sigmoid(log_alpha / beta * 0.8)``."""
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
"""Sheared-LLaMA clamps ``log_alpha`` to this range after each step."""


def sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """A reparameterised hard-concrete sample per entry, differentiable in ``log_alpha``; same shape."""
    u = torch.rand_like(log_alpha).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the probability that the unit survives; differentiable, same shape."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def soft_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic value of a kept gate, ``sigmoid(log_alpha / beta * 0.8)`` (Sheared-LLaMA)."""
    return torch.sigmoid(log_alpha / BETA * DETERMINISTIC_SHARPNESS)


def keep_top_k(scores: torch.Tensor, values: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring entries of each row of ``values`` and zero the rest.

    Args:
        scores: ``[..., n]`` ranking (ties broken by position, lowest index first).
        values: ``[..., n]`` what the kept entries hold (soft gate values or ones).
        k: entries kept per row: an int, or an integer tensor of shape ``[...]``.
    Returns:
        ``[..., n]``, ``values`` where kept, 0 elsewhere.
    """
    rank = ranks(scores, descending=True)
    k = torch.as_tensor(k, device=scores.device)
    return torch.where(rank < k.unsqueeze(-1), values, torch.zeros_like(values))


def ranks(scores: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Each entry's position ``0 .. n-1`` in its row (the last dim) sorted by score; ties by index (stable)."""
    order = torch.argsort(scores, dim=-1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank
