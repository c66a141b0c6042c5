"""DVAE#'s power-function overlapping relaxation of a Boltzmann prior (`model.relaxation: power`).

Each binary unit z_i is smoothed by r(ζ|z) on [0, 1]: r(ζ|0) = λ ζ^(λ-1), r(ζ|1) = r(1-ζ|0),
λ = 1/β (β = `model.power_beta`; the DVAE# code uses 20–40 for these MNIST structures). Then

- posterior: q(ζ|x) = Π_i [(1-q_i) r(ζ_i|0) + q_i r(ζ_i|1)], q_i = σ(α_i); a sample draws
  z_i ~ Bern(q_i) and ζ_i ~ r(·|z_i) (ζ = ρ^β for z = 0, ρ uniform), and its gradient in q is
  the implicit one, ∂ζ/∂q = (R(ζ|0) - R(ζ|1)) / mixture density (R the CDFs);
- prior: p(ζ) = Σ_z p(z) Π_i r(ζ_i|z_i) = Z̃(ζ)/Z, where Z̃(ζ) is the partition function of
  the prior with each unit's bias shifted by b_i(ζ) = log r(ζ_i|1) - log r(ζ_i|0) (plus
  Σ_i log r(ζ_i|0)). log Z̃(ζ) is estimated by mean field (5 sweeps from ½, as in the DVAE#
  code): log Z̃ ≥ -E_aug(m) + H(m), with the gradient taken at the fixed point m.

So the training bound is E[log p(x|ζ) + log Z̃_MF(ζ) - log q(ζ|x)] - log Z, and log Z enters
through the negative phase exactly as with GumBolt. As β → ∞, ζ → z and the bound tends to the
discrete ELBO. Evaluation is unchanged: hard z.

Every density here is computed from (log ζ, log(1-ζ)), carried separately and exactly: ζ = ρ^40
underflows float32 for ρ < 0.08, and 1 - ζ rounds to 1 long before that. log ζ is floored at
`LOG_FLOOR` (ζ ≥ e^-700, a truncation of probability < 3e-8 per unit at β = 40), so the
float64 arithmetic never overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.special import entr

#: log ζ is floored here (float64 underflows near e^-745; e^{(λ-1)·log ζ} must stay finite).
LOG_FLOOR = -700.0
#: Mean-field sweeps for log Z̃(ζ) (the DVAE# code's count), each over every colour class.
MEAN_FIELD_SWEEPS = 5


def _straight_zero(value: torch.Tensor, slope: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`value` whose gradient in q is `slope` (both detached): value + slope·q - stop(slope·q)."""
    term = slope * q
    return value + (term - term.detach())


def power_sample(
    logits: torch.Tensor, beta: float, num_samples: int, generator: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed samples of the power-function mixture: (log ζ, log(1-ζ)), each
    (S, *logits.shape) in the logits' dtype, differentiable in the logits (implicit gradient).

    >>> import torch
    >>> lz, l1z = power_sample(torch.zeros(3), 40.0, 2, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(lz.exp() + l1z.exp(), torch.ones(2, 3)))
    True
    """
    lam = 1.0 / beta
    device = generator.device if generator is not None else logits.device
    shape = (num_samples, *logits.shape)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    rho = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    u, rho = u.to(logits.device), rho.to(logits.device)
    logits64 = logits.detach().double()
    q64 = torch.sigmoid(logits64)
    log_zeta0 = (beta * torch.log(rho)).clamp_min(LOG_FLOOR)  # ζ0 = ρ^β ~ r(·|0)
    log_1m_zeta0 = torch.log(-torch.expm1(log_zeta0))
    one = u < q64  # z = 1: ζ = 1 - ζ0
    lz = torch.where(one, log_1m_zeta0, log_zeta0)
    l1z = torch.where(one, log_zeta0, log_1m_zeta0)
    # ∂ζ/∂q = (R0(ζ) - R1(ζ)) / f(ζ), R0 = ζ^λ, R1 = 1 - (1-ζ)^λ, f the mixture density
    cdf_gap = torch.expm1(lam * lz) + torch.exp(lam * l1z)
    log_f = log_mixture_density(logits64, lz, l1z, beta)
    d_lz = cdf_gap * torch.exp(-lz - log_f)  # ∂ log ζ / ∂q = (∂ζ/∂q) / ζ
    d_l1z = -cdf_gap * torch.exp(-l1z - log_f)  # ∂ log(1-ζ) / ∂q
    dtype = logits.dtype
    q = torch.sigmoid(logits).expand(shape)
    return (_straight_zero(lz.to(dtype), d_lz.to(dtype), q),
            _straight_zero(l1z.to(dtype), d_l1z.to(dtype), q))


def log_mixture_density(
    logits: torch.Tensor, log_zeta: torch.Tensor, log_1m_zeta: torch.Tensor, beta: float
) -> torch.Tensor:
    """log q(ζ|x) per unit: log[(1-q) r(ζ|0) + q r(ζ|1)], q = σ(logits), same shape as ζ."""
    lam = 1.0 / beta
    return math.log(lam) + torch.logaddexp(
        torch.nn.functional.logsigmoid(-logits) + (lam - 1) * log_zeta,
        torch.nn.functional.logsigmoid(logits) + (lam - 1) * log_1m_zeta,
    )


def smoothing_terms(
    log_zeta: torch.Tensor, log_1m_zeta: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b(ζ), Σ_i c_i(ζ)): the bias shift log r(ζ|1) - log r(ζ|0) per unit and the constant
    Σ_i log r(ζ_i|0) of the augmented Boltzmann machine, for any leading shape."""
    lam = 1.0 / beta
    shift = (lam - 1) * (log_1m_zeta - log_zeta)
    const = (math.log(lam) + (lam - 1) * log_zeta).sum(-1)
    return shift, const


#: One colour class: its unit indices and the prior's local field on them at mean values m.
FieldFn = Callable[[torch.Tensor], torch.Tensor]


def mean_field_free_energy(
    energy: Callable[[torch.Tensor], torch.Tensor],
    classes: Sequence[tuple[torch.Tensor, FieldFn]],
    shift: torch.Tensor,
    const: torch.Tensor,
    sweeps: int = MEAN_FIELD_SWEEPS,
) -> torch.Tensor:
    """-log Z̃(ζ) by mean field: E_aug(m) - H(m) at m after `sweeps` sweeps from ½, (N,).

    `energy(m)` is the prior's energy (multilinear, so exact at mean values), `classes` its
    colour classes with their local fields, `shift` (N, n) and `const` (N,) from
    `smoothing_terms`. m is held fixed (no gradient through the sweeps), so the gradient is
    that of E_aug at m: in the prior's parameters and in ζ through `shift` and `const`.
    The value is an upper bound on -log Z̃(ζ), exact when the prior has no couplings.
    """
    with torch.no_grad():
        m = torch.full_like(shift, 0.5)
        fixed_shift = shift.detach()
        for _ in range(sweeps):
            for units, field in classes:
                m[:, units] = torch.sigmoid(field(m) + fixed_shift[:, units])
    augmented = energy(m) - (shift * m).sum(-1) - const
    return augmented - (entr(m) + entr(1 - m)).sum(-1)
