"""Numerical guards shared by samplers: the dtype's precision, and a mixing certificate.

Precision. A unit's input is β(b_i + Σ_j W_ij s_j); its magnitude is at most
M = β max_i (|b_i| + Σ_j |W_ij|), and summing it in a float type with machine epsilon ε can be
off by about ε·M. Once ε·M > 1 the conditional probabilities, which depend on that input to
within a nat, are no longer computed, only rounded (and past the type's range, inf − inf makes
NaN, which a sampler turns into garbage states). `check_precision` refuses such parameters
before any work, naming the parameter and the fix (float64 moves the bound from ~8e6 to ~4e15).

Mixing. Under the RBM's law a visible state v whose single-unit flip v⁽ⁱ⁾ has F(v) − F(v⁽ⁱ⁾) > G
is e^G times less probable than that neighbour, so the states with any such flip carry at most
n_visible·e^−G of the mass (under the rounded relaxed law π_τ the log-ratio can shrink to about
G/2 + log τ, since F is concave along the flip). With G = 60 a sample like that is a
certificate that the chain has not reached its stationary law: it fires on chains stuck far
above the minimum energy (couplings ×10³) and, by the bound, essentially never on mixed ones.
It cannot see chains stuck in a state every single flip of which is worse (a local minimum).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from qvae.rbm import RBM

#: Nats by which a single flip must beat a sample for the sample to count as implausible.
IMPLAUSIBLE_GAIN = 60.0
#: Elements (samples × n_visible × n_hidden) the certificate may touch per call.
CHECK_ELEMENTS = 1 << 24
_CHUNK_ELEMENTS = 1 << 22


class MixingWarning(RuntimeWarning):
    """A continuous sampler's samples show that its chains have not mixed."""


def _input_bounds(rbm: RBM) -> tuple[float, float, float]:
    """(M, max |W|, max |bias|) of `rbm` at β = 1, in float64 if the RBM's dtype overflows."""
    w = rbm.effective_weight().detach()
    b, c = rbm.visible_bias.detach(), rbm.hidden_bias.detach()
    for dtype in (w.dtype, torch.float64):
        aw = w.to(dtype).abs()
        m = max(float((b.to(dtype).abs() + aw.sum(1)).max()),
                float((c.to(dtype).abs() + aw.sum(0)).max()))
        if math.isfinite(m):
            break
    weight = float(w.abs().max())
    bias = max(float(b.abs().max()), float(c.abs().max()))
    return m, weight, bias


def precision_limit(dtype: torch.dtype) -> float:
    """The largest unit input β(|b| + Σ|W|) whose rounding error in `dtype` stays under 1."""
    return 1.0 / torch.finfo(dtype).eps


def check_precision(rbm: RBM, dtype: torch.dtype, *, backend: str, beta: float = 1.0) -> None:
    """ValueError when `rbm` (times `beta`) is too large to sample in `dtype` (module doc)."""
    m, weight, bias = _input_bounds(rbm)
    m *= beta
    limit = precision_limit(dtype)
    if m <= limit:  # also False for NaN/inf
        return
    name = str(dtype).removeprefix("torch.")
    param = "weight" if weight >= bias else "visible_bias/hidden_bias"
    largest = max(weight, bias)
    fix = ("use dtype='float64'" if dtype != torch.float64 and m <= precision_limit(torch.float64)
           else "rescale the RBM (at this scale sampling is a search for the ground state: "
           "use neal)")
    raise ValueError(
        f"{backend}: the RBM's {param} (largest |value| {largest:.3g}"
        f"{f', times beta {beta:g}' if beta != 1 else ''}) is too large for dtype={name!r}: a "
        f"unit's input can reach {m:.3g}, beyond {limit:.3g}, where {name} rounding errors "
        f"exceed one nat and the samples would be rounding noise; {fix}"
    )


@torch.no_grad()
def flip_gains(rbm: RBM, visible: torch.Tensor, *, max_elements: int = CHECK_ELEMENTS
               ) -> torch.Tensor:
    """max_i [F(v) − F(v⁽ⁱ⁾)] (nats) for the first samples of `visible` (as many as
    `max_elements` allows, at least one), float64: how much more probable the best single flip
    of each sample is under the RBM."""
    dev = rbm.weight.device
    w = rbm.effective_weight().detach().to(torch.float64)
    b = rbm.visible_bias.detach().to(torch.float64)
    c = rbm.hidden_bias.detach().to(torch.float64)
    nv, nh = w.shape
    per_sample = max(1, nv * nh)
    count = min(len(visible), max(1, max_elements // per_sample))
    chunk = max(1, _CHUNK_ELEMENTS // per_sample)
    out = []
    for start in range(0, count, chunk):
        v = visible[start : min(start + chunk, count)].detach().to(dev, torch.float64)
        a = c + v @ w                                     # (k, nh) hidden inputs
        d = 1.0 - 2.0 * v                                 # (k, nv) the flip's change
        flipped = a[:, None, :] + d[:, :, None] * w[None]  # (k, nv, nh)
        gain = (torch.nn.functional.softplus(flipped).sum(-1)
                - torch.nn.functional.softplus(a).sum(-1, keepdim=True) + d * b)
        out.append(gain.max(-1).values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mixing_check(rbm: RBM, visible: torch.Tensor, *, backend: str) -> dict[str, Any]:
    """Info entries of the mixing certificate for rounded samples; warns when it fires.

    `max_flip_gain`: the largest single-flip gain (nats) among the checked samples;
    `unmixed_fraction`: the fraction of them whose gain exceeds IMPLAUSIBLE_GAIN; `unmixed`:
    True when any does (a MixingWarning says so).
    """
    gains = flip_gains(rbm, visible)
    if not len(gains):
        return {"unmixed": False}
    bad = gains > IMPLAUSIBLE_GAIN
    info = {"max_flip_gain": float(gains.max()), "unmixed_fraction": float(bad.double().mean()),
            "unmixed": bool(bad.any())}
    if info["unmixed"]:
        warnings.warn(
            f"{backend}: the chains have not mixed: {info['unmixed_fraction']:.0%} of the "
            f"checked samples have a single-unit flip e^{info['max_flip_gain']:.0f} times more "
            f"probable (threshold e^{IMPLAUSIBLE_GAIN:.0f}), so they sit far above the "
            "stationary law's energies whatever the acceptance rate says; use more burn_in / "
            "num_steps, a smaller step_size, or a binary sampler (gibbs, neal) for an RBM this "
            "peaked",
            MixingWarning, stacklevel=5,
        )
    return info
