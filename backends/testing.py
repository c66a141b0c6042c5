"""Conformance suite every backend passes, and pytest helpers to run users' tests on every backend.

The statistical check compares a backend's samples with exact enumeration on small RBMs. For N
independent draws over K visible states, the total-variation distance TV = ½ Σ|p̂_k − p_k| has
E[TV] ≤ ½ Σ_k sqrt(p_k (1 − p_k) / N) (Jensen), and changing one draw moves TV by at most 1/N, so
McDiarmid gives P(TV > E[TV] + t) ≤ exp(−2 N t²). The tolerance is therefore

    tol = ½ Σ_k sqrt(p_k (1 − p_k) / N) + sqrt(ln(1/δ) / (2N)),

false-alarm probability ≤ δ (1e-6 by default). Moments use a Bonferroni-corrected z-score.
MCMC backends pass when each returned sample comes from its own, mixed chain.

Use it in your own tests:

>>> from backends.testing import run_conformance
>>> report = run_conformance("exact", num_samples=4000)   # raises AssertionError on failure
>>> sorted(report)[:2]
['bad_input', 'distribution']

or run your code on every backend with pytest::

    from backends.testing import parametrize_backends

    @parametrize_backends()            # skips backends unavailable here, with the reason
    def test_my_code(sampler_name):
        sampler = backends.get_sampler(sampler_name)
        ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from scipy.stats import norm

from backends.base import Sampler
from backends.registry import availability, get_sampler, registered, sampler_class

# The exact reference lives in the core (qvae compare uses it too); re-exported for tests.
from qvae.exact_distribution import (  # noqa: F401
    exact_moments,
    exact_visible_marginal,
    total_variation,
    visible_index,
)
from qvae.rbm import RBM

SamplerFactory = Callable[[], Sampler]


# ------------------------------------------------------------------ reference models
def random_rbm(n_visible: int, n_hidden: int, *, scale: float = 1.0, seed: int = 0) -> RBM:
    """A random RBM with couplings ~ N(0, scale²) and biases ~ N(0, (scale/2)²)."""
    gen = torch.Generator().manual_seed(seed)
    rbm = RBM(n_visible, n_hidden, init_std=0.0)
    with torch.no_grad():
        rbm.weight.copy_(torch.randn(n_visible, n_hidden, generator=gen) * scale)
        rbm.visible_bias.copy_(torch.randn(n_visible, generator=gen) * scale / 2)
        rbm.hidden_bias.copy_(torch.randn(n_hidden, generator=gen) * scale / 2)
    return rbm


def reference_rbms() -> list[RBM]:
    """The small RBMs the suite checks against enumeration (couplings of order 1)."""
    return [random_rbm(6, 4, seed=1), random_rbm(8, 8, seed=2)]


def tv_tolerance(p_exact: torch.Tensor, num_samples: int, delta: float = 1e-6) -> float:
    """Bound on TV that N exact samples exceed with probability ≤ delta (see module doc)."""
    expected = 0.5 * float(torch.sqrt(p_exact * (1 - p_exact) / num_samples).sum())
    return expected + math.sqrt(math.log(1 / delta) / (2 * num_samples))


# ------------------------------------------------------------------------- checks
def _factory(sampler: str | SamplerFactory, options: dict[str, Any] | None) -> SamplerFactory:
    if callable(sampler):
        return sampler
    opts = {**sampler_class(sampler).conformance_options, **(options or {})}
    return lambda: get_sampler(sampler, **opts)


def check_shapes(sampler: Sampler, rbm: RBM, num_samples: int = 64) -> None:
    out = sampler.sample(rbm, num_samples, seed=0)
    assert tuple(out.visible.shape) == (num_samples, rbm.n_visible), out.visible.shape
    assert tuple(out.hidden.shape) == (num_samples, rbm.n_hidden), out.hidden.shape
    assert tuple(out.energy.shape) == (num_samples,), out.energy.shape
    for name in ("visible", "hidden", "energy"):
        tensor = getattr(out, name)
        assert tensor.dtype == rbm.weight.dtype, f"{name} dtype {tensor.dtype}"
        assert not tensor.requires_grad, f"{name} must be detached"
    assert torch.all((out.visible == 0) | (out.visible == 1)), "visible not in {0,1}"
    assert torch.all((out.hidden == 0) | (out.hidden == 1)), "hidden not in {0,1}"
    if not sampler.binary:
        assert out.continuous is not None, "continuous backends must return .continuous"
    timing = out.info.get("timing", {})
    missing = {"preprocess_s", "sample_s", "postprocess_s", "total_s"} - set(timing)
    assert not missing, f"info['timing'] lacks {missing}"


def check_energies(sampler: Sampler, rbm: RBM, num_samples: int = 256) -> None:
    out = sampler.sample(rbm, num_samples, seed=1)
    with torch.no_grad():
        recomputed = rbm.energy(out.visible, out.hidden)
    err = float((recomputed - out.energy).abs().max())
    assert err <= 1e-4 * (1 + float(recomputed.abs().max())), f"energy mismatch {err}"


def check_reproducible(make: SamplerFactory, rbm: RBM, num_samples: int = 128) -> None:
    a = make().sample(rbm, num_samples, seed=123)
    b = make().sample(rbm, num_samples, seed=123)
    assert torch.equal(a.visible, b.visible) and torch.equal(a.hidden, b.hidden), (
        "same seed, fresh sampler, different samples"
    )
    c = make().sample(rbm, num_samples, seed=124)
    assert not torch.equal(a.states, c.states), "different seeds gave identical samples"


def check_bad_input(sampler: Sampler, rbm: RBM) -> None:
    def expect(exc: type[Exception], fn: Callable[[], Any], what: str) -> None:
        try:
            fn()
        except exc:
            return
        raise AssertionError(f"{what} did not raise {exc.__name__}")

    expect(ValueError, lambda: sampler.sample(rbm, 0), "num_samples=0")
    expect(ValueError, lambda: sampler.sample(rbm, -3), "num_samples=-3")
    expect(TypeError, lambda: sampler.sample(rbm, 2.5), "num_samples=2.5")  # type: ignore[arg-type]
    expect(TypeError, lambda: sampler.sample("rbm", 4), "a non-RBM")  # type: ignore[arg-type]
    expect(TypeError, lambda: sampler.sample(rbm, 4, seed="x"), "seed='x'")  # type: ignore[arg-type]
    for name, value in (("weight", float("nan")), ("hidden_bias", float("inf"))):
        bad = random_rbm(rbm.n_visible, rbm.n_hidden)
        with torch.no_grad():
            getattr(bad, name).view(-1)[0] = value
        expect(ValueError, lambda bad=bad: sampler.sample(bad, 4), f"{name} = {value}")


def check_distribution(
    make: SamplerFactory, rbm: RBM, num_samples: int, *, delta: float = 1e-6, seed: int = 7
) -> dict[str, float]:
    """TV of the visible marginal and Bonferroni z-scores of all first and second moments."""
    out = make().sample(rbm, num_samples, seed=seed)
    p = exact_visible_marginal(rbm)
    tv, tol = total_variation(out.visible, p), tv_tolerance(p, num_samples, delta)
    assert tv <= tol, f"TV {tv:.4f} > tolerance {tol:.4f} for {rbm!r} with N={num_samples}"
    exact = exact_moments(rbm)
    v, h = out.visible.double().cpu(), out.hidden.double().cpu()
    empirical = {"v": v.mean(0), "h": h.mean(0), "vh": v.T @ h / num_samples}
    n_moments = sum(t.numel() for t in exact.values())
    z_crit = float(norm.isf(delta / (2 * n_moments)))
    worst = 0.0
    for key, m in exact.items():
        sd = torch.sqrt(m * (1 - m) / num_samples).clamp_min(0.5 / num_samples)
        z = float(((empirical[key] - m).abs() / sd).max())
        worst = max(worst, z)
        assert z <= z_crit, f"moment <{key}> off by {z:.1f} sd (limit {z_crit:.1f})"
    return {"tv": tv, "tv_tolerance": tol, "max_moment_z": worst, "z_limit": z_crit}


def run_conformance(
    sampler: str | SamplerFactory,
    *,
    options: dict[str, Any] | None = None,
    num_samples: int = 20000,
    rbms: Sequence[RBM] | None = None,
    delta: float = 1e-6,
) -> dict[str, Any]:
    """Run every check on a backend name (with its `conformance_options`) or a factory.

    Returns a report; raises AssertionError naming the first failed check.
    """
    make = _factory(sampler, options)
    rbms = list(rbms) if rbms is not None else reference_rbms()
    report: dict[str, Any] = {"distribution": []}
    check_shapes(make(), rbms[0])
    report["shapes"] = "ok"
    check_energies(make(), rbms[0])
    report["energies"] = "ok"
    check_reproducible(make, rbms[0])
    report["reproducible"] = "ok"
    check_bad_input(make(), rbms[0])
    report["bad_input"] = "ok"
    for rbm in rbms:
        stats = check_distribution(make, rbm, num_samples, delta=delta)
        report["distribution"].append({"rbm": repr(rbm), **stats})
    return report


# ------------------------------------------------------------------ pytest helpers
def backend_params(names: Sequence[str] | None = None) -> list[Any]:
    """pytest params for each backend, marked skip (with the reason) where unavailable."""
    import pytest

    status = availability()
    params = []
    for name in names if names is not None else registered():
        ok, reason = status.get(name, (False, f"unknown backend {name!r}"))
        marks = () if ok else (pytest.mark.skip(reason=f"{name}: {reason}"),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def parametrize_backends(
    names: Sequence[str] | None = None, argname: str = "sampler_name"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: run a test once per backend, skipping those unavailable here."""
    import pytest

    return pytest.mark.parametrize(argname, backend_params(names))
