"""Conformance suite every backend passes, and pytest helpers to run users' tests on every backend.

The statistical check compares a backend's samples with exact enumeration on small RBMs (on
Boltzmann machines and conditionals: the full state z, against `exact_log_probs`). For N
independent draws over K visible states, the total-variation distance TV = ½ Σ|p̂_k − p_k| has
E[TV] ≤ ½ Σ_k sqrt(p_k (1 − p_k) / N) (Jensen), and changing one draw moves TV by at most 1/N, so
McDiarmid gives P(TV > E[TV] + t) ≤ exp(−2 N t²). The tolerance is therefore

    tol = ½ Σ_k sqrt(p_k (1 − p_k) / N) + sqrt(ln(1/δ) / (2N)),

false-alarm probability ≤ δ (1e-6 by default). Moments use a Bonferroni-corrected z-score.
MCMC backends pass when each returned sample comes from its own, mixed chain.

Beyond RBMs every backend is checked on a complete 4-partite Boltzmann machine and on a graph with
odd cycles (`reference_bms`): a backend that samples any graph (`backends.bqm.samples_any_graph`)
must match enumeration, any other must refuse with NotImplementedError. And conditionals: with
`clamp=` on an RBM and on BMs, the clamped units hold their values in every sample and the free
units follow the exact conditional (`check_conditional`).

Use it in your own tests:

>>> from backends.testing import run_conformance
>>> report = run_conformance("exact", num_samples=4000)   # raises AssertionError on failure
>>> sorted(report)[:4]
['bad_input', 'bm_distribution', 'conditional', 'distribution']

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
from backends.bqm import samples_any_graph
from backends.registry import availability, get_sampler, registered, sampler_class
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import from_rbm, multipartite
from qvae.conditioning import condition

# The exact reference lives in the core (qvae compare uses it too); re-exported for tests.
from qvae.exact_distribution import (  # noqa: F401
    exact_moments,
    exact_visible_marginal,
    total_variation,
    visible_index,
)
from qvae.rbm import RBM, states_from_index

SamplerFactory = Callable[[], Sampler]

#: A 9-unit graph with odd cycles: a 5-cycle 0-1-2-3-4 with the chord (0, 2) (so triangles), a
#: triangle 5-6-7, and edges tying them together; it needs three colours.
ODD_CYCLE_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (0, 2), (5, 6), (6, 7), (5, 7),
                   (4, 5), (3, 8), (6, 8), (1, 7))


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


def _random_parameters(bm: BoltzmannMachine, scale: float, seed: int) -> BoltzmannMachine:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bm.coupling.copy_(torch.randn(bm.n_edges, generator=gen) * scale)
        bm.bias.copy_(torch.randn(bm.n_units, generator=gen) * scale / 2)
    return bm


def odd_cycle_bm(*, scale: float = 1.0, seed: int = 0) -> BoltzmannMachine:
    """The `ODD_CYCLE_EDGES` graph (9 units, 3 colour classes) with couplings ~ N(0, scale²)
    and biases ~ N(0, (scale/2)²)."""
    return _random_parameters(BoltzmannMachine(9, ODD_CYCLE_EDGES), scale, seed)


def reference_bms() -> list[BoltzmannMachine]:
    """The Boltzmann machines the suite checks against enumeration (2^9 states each, couplings
    of order 1): a complete 4-partite model of parts [3, 2, 2, 2], and `odd_cycle_bm`."""
    return [_random_parameters(multipartite([3, 2, 2, 2]), 1.0, 3), odd_cycle_bm(seed=4)]


def reference_conditionals() -> list[tuple[RBM | BoltzmannMachine, dict[int, int]]]:
    """(model, clamp) pairs of the conditional check: an RBM with two visible units and one
    hidden unit clamped; the complete 4-partite model with two units clamped (four colour
    classes remain); a 3-partite model with one whole part and one more unit clamped (the free
    units are bipartite, so every backend samples it)."""
    return [
        (random_rbm(6, 4, seed=1), {0: 1, 3: 0, 7: 1}),
        (reference_bms()[0], {0: 1, 3: 0}),
        (_random_parameters(multipartite([3, 3, 2]), 1.0, 5), {6: 1, 7: 0, 0: 1}),
    ]


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


def _expect_refusal(sampler: Sampler, model: BoltzmannMachine, **kwargs: Any) -> str:
    """A backend without a kernel for this graph must say so with NotImplementedError."""
    try:
        sampler.sample(model, 8, seed=0, **kwargs)
    except NotImplementedError as exc:
        assert str(exc), "NotImplementedError without a message"
        return str(exc)
    raise AssertionError(
        f"backend {sampler.name!r} samples bipartite models only (no general_bqm, no _sample_bm "
        f"kernel) but returned samples of a model with {len(model.colour_classes)} colour "
        "classes; declare the capability or raise NotImplementedError")


def _full_state_stats(states: torch.Tensor, log_p: torch.Tensor, edges: torch.Tensor,
                      num_samples: int, delta: float, what: str) -> dict[str, float]:
    """TV of the full state against exp(log_p) (index bit i = unit i), and Bonferroni z-scores
    of ⟨z_i⟩ and of ⟨z_i z_j⟩ on `edges`."""
    p = log_p.exp()
    tv, tol = total_variation(states, p), tv_tolerance(p, num_samples, delta)
    assert tv <= tol, f"TV {tv:.4f} > tolerance {tol:.4f} for {what} with N={num_samples}"
    n = states.shape[1]
    table = all_states(n)
    z = states.double().cpu()
    pairs = (edges[:, 0].cpu(), edges[:, 1].cpu())
    exact = {"z": p @ table, "zz": p @ (table[:, pairs[0]] * table[:, pairs[1]])}
    empirical = {"z": z.mean(0), "zz": (z[:, pairs[0]] * z[:, pairs[1]]).mean(0)}
    z_crit = float(norm.isf(delta / (2 * sum(t.numel() for t in exact.values()))))
    worst = 0.0
    for key, m in exact.items():
        if m.numel() == 0:
            continue
        # a clamped unit's mean is 1 or 0 up to rounding: keep the variance >= 0
        sd = torch.sqrt((m * (1 - m)).clamp_min(0) / num_samples).clamp_min(0.5 / num_samples)
        score = float(((empirical[key] - m).abs() / sd).max())
        worst = max(worst, score)
        assert score <= z_crit, f"moment <{key}> off by {score:.1f} sd (limit {z_crit:.1f}) " \
            f"for {what}"
    return {"tv": tv, "tv_tolerance": tol, "max_moment_z": worst, "z_limit": z_crit}


def all_states(n: int) -> torch.Tensor:
    """All 2^n states (row k has bit i = unit i), float64: the rows of `exact_log_probs`."""
    return states_from_index(torch.arange(2**n), n, torch.float64)


def check_bm_distribution(
    make: SamplerFactory, bm: BoltzmannMachine, num_samples: int, *, delta: float = 1e-6,
    seed: int = 7
) -> dict[str, Any]:
    """A BoltzmannMachine's samples: shapes, {0,1} values, energies, and the full-state
    distribution against enumeration (TV and moments, as `check_distribution`). A backend that
    samples bipartite models only must instead refuse a non-bipartite one with
    NotImplementedError ({"refused": message})."""
    sampler = make()
    if len(bm.colour_classes) > 2 and not samples_any_graph(sampler):
        return {"bm": repr(bm), "refused": _expect_refusal(sampler, bm)}
    out = sampler.sample(bm, num_samples, seed=seed)
    states = out.states
    assert not out.layered, "a BoltzmannMachine's samples must have no layers (use .states)"
    assert tuple(states.shape) == (num_samples, bm.n_units), states.shape
    assert states.dtype == bm.bias.dtype and not states.requires_grad, states.dtype
    assert torch.all((states == 0) | (states == 1)), "states not in {0,1}"
    with torch.no_grad():
        recomputed = bm.energy(states)
    err = float((recomputed - out.energy).abs().max())
    assert err <= 1e-4 * (1 + float(recomputed.abs().max())), f"energy mismatch {err}"
    stats = _full_state_stats(states, bm.exact_log_probs(), bm.edges, num_samples, delta,
                              repr(bm))
    return {"bm": repr(bm), **stats}


def check_conditional(
    make: SamplerFactory, model: RBM | BoltzmannMachine, clamp: dict[int, int],
    num_samples: int, *, delta: float = 1e-6, seed: int = 11
) -> dict[str, Any]:
    """`sample(model, N, clamp=clamp)`: the clamped units hold their values in every sample,
    energies are under the full model, and the full state follows the exact conditional
    p(z | z_C = x_C) (TV and moments against enumeration). A backend that samples bipartite
    models only must refuse a clamp whose free units are not bipartite (NotImplementedError)."""
    sampler = make()
    bm = from_rbm(model) if isinstance(model, RBM) else model
    reduced = condition(bm, clamp).model
    if reduced is not None and len(reduced.colour_classes) > 2 and not samples_any_graph(sampler):
        return {"model": repr(model), "refused": _expect_refusal(sampler, bm, clamp=clamp)}
    out = sampler.sample(model, num_samples, seed=seed, clamp=clamp)
    states = out.states
    assert tuple(states.shape) == (num_samples, bm.n_units), states.shape
    units = torch.tensor(sorted(clamp))
    values = torch.tensor([float(clamp[k]) for k in sorted(clamp)], dtype=states.dtype)
    held = (states[:, units].cpu() == values).all(1)
    assert bool(held.all()), (f"{int((~held).sum())} of {num_samples} samples changed a clamped "
                              f"unit (clamp={clamp})")
    assert out.info.get("clamped") == len(clamp), f"info['clamped'] = {out.info.get('clamped')}"
    with torch.no_grad():
        recomputed = bm.energy(states)
    err = float((recomputed - out.energy).abs().max())
    assert err <= 1e-4 * (1 + float(recomputed.abs().max())), f"energy mismatch {err}"
    log_p = bm.exact_log_probs()
    table = all_states(bm.n_units)
    consistent = (table[:, units] == values.double()).all(1)
    log_p = torch.where(consistent, log_p, torch.tensor(-math.inf, dtype=log_p.dtype))
    log_p = log_p - torch.logsumexp(log_p, 0)
    stats = _full_state_stats(states, log_p, bm.edges, num_samples, delta,
                              f"{model!r} given clamp={clamp}")
    return {"model": repr(model), "clamp": dict(clamp), **stats}


def run_conformance(
    sampler: str | SamplerFactory,
    *,
    options: dict[str, Any] | None = None,
    num_samples: int = 20000,
    rbms: Sequence[RBM] | None = None,
    delta: float = 1e-6,
    bm_samples: int | None = None,
) -> dict[str, Any]:
    """Run every check on a backend name (with its `conformance_options`) or a factory.

    `bm_samples`: samples per Boltzmann-machine and conditional check; by default
    `num_samples`, and a tenth of it (at least 1000) for a continuous backend, whose chains
    cost ~100x more per sample (the tolerances follow N, so they are looser, not wrong).
    Returns a report; raises AssertionError naming the first failed check.
    """
    make = _factory(sampler, options)
    rbms = list(rbms) if rbms is not None else reference_rbms()
    report: dict[str, Any] = {"distribution": [], "bm_distribution": [], "conditional": []}
    first = make()
    if bm_samples is None:
        bm_samples = num_samples if first.binary else max(1000, num_samples // 10)
    check_shapes(first, rbms[0])
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
    for bm in reference_bms():
        report["bm_distribution"].append(check_bm_distribution(make, bm, bm_samples,
                                                               delta=delta))
    for model, clamp in reference_conditionals():
        report["conditional"].append(check_conditional(make, model, clamp, bm_samples,
                                                       delta=delta))
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
