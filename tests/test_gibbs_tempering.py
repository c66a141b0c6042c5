"""Replica exchange (parallel tempering) in the `gibbs` backend: `num_replicas`, `min_beta`
(backends/tempering.py, the kernels and the sampler in backends/gibbs.py).

The statistical checks compare with exact enumeration through `backends.testing`: TV of N
independent samples (one chain each) against `tv_tolerance` (its derivation, E[TV] bound plus
McDiarmid, false alarm ≤ 1e-6, is in that module's docstring) and Bonferroni z-scores of the
moments. Every test is seeded and takes a few seconds at most on one core.
"""

from __future__ import annotations

import doctest
import math
import re

import httpx
import pytest
import torch

import backends
from backends import tempering
from backends.base import ProblemShape
from backends.gibbs import GibbsSampler
from backends.options import OptionError
from backends.tempering import ReplicaExchange, ladder
from backends.testing import (
    check_distribution,
    exact_visible_marginal,
    random_rbm,
    run_conformance,
    total_variation,
    tv_tolerance,
)
from qvae.boltzmann_graphs import from_rbm
from qvae.rbm import RBM
from qvae.service.testing import running_service

PT = {"num_replicas": 4, "min_beta": 0.3}


# --------------------------------------------------------------------------- the moves
def test_module_examples():
    assert doctest.testmod(tempering).failed == 0


def test_ladder_is_geometric_from_the_target_beta():
    assert ladder(2.0, 0.25, 3) == [2.0, 1.0, 0.5]
    assert ladder(0.7, 0.3, 1) == [0.7]
    betas = ladder(1.5, 0.1, 8)
    assert betas[0] == 1.5 and betas[-1] == pytest.approx(0.15)
    ratios = [b / a for a, b in zip(betas, betas[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_swap_accepts_with_the_metropolis_probability_of_the_exchange():
    """Replica 0 (β = 1) holds E = 1, replica 1 (β = 0.5) E = 0: exchanging gives the cold
    replica the lower state, a = (1 − 0.5)(1 − 0) = 0.5 > 0: always accepted. With the
    energies the other way round a = −0.5: accepted with probability e^−0.5 ≈ 0.607, checked on
    10^5 chains to 5 sd (sd ≈ 0.0015). A flipped sign swaps the second case always."""
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    for e0, e1, expected in ((1.0, 0.0, 1.0), (0.0, 1.0, math.exp(-0.5))):
        ex = ReplicaExchange([1.0, 0.5], n, device="cpu", dtype=torch.float64)
        energy = torch.cat([torch.full((n,), e0), torch.full((n,), e1)]).double()
        perm = ex.swap(energy, torch.rand(n, generator=gen, dtype=torch.float64))
        swapped = (perm[:n] == torch.arange(n) + n).double()
        assert torch.equal(perm[n:][swapped.bool()], torch.arange(n)[swapped.bool()])
        sd = math.sqrt(expected * (1 - expected) / n)
        assert abs(float(swapped.mean()) - expected) <= 5 * sd + 1e-12, (e0, e1)
        assert ex.acceptance() == [pytest.approx(expected)]
        # K = 2 has no odd pair: the next round proposes nothing
        assert ex.parity == 1
        assert torch.equal(ex.swap(energy, torch.zeros(n, dtype=torch.float64)),
                           torch.arange(2 * n))


def test_rounds_alternate_between_even_and_odd_pairs():
    ex = ReplicaExchange(ladder(1.0, 0.5, 4), 1, device="cpu", dtype=torch.float32)
    energy = torch.tensor([3.0, 2.0, 1.0, 0.0])  # every pair wants to swap: a > 0
    u = torch.full((3,), 0.5)
    assert ex.swap(energy, u).tolist() == [1, 0, 3, 2]  # even: 0-1, 2-3
    assert ex.swap(energy, u).tolist() == [0, 2, 1, 3]  # odd: 1-2
    assert ex.swap(energy, u).tolist() == [1, 0, 3, 2]


# ------------------------------------------------------------------ exact enumeration
def test_tempered_samples_match_exact_enumeration_on_a_small_rbm():
    """5 + 5 units, couplings ~ N(0, 1.5²): the joint over all 2^10 (v, h) states and the
    visible marginal with its moments, of N = 20000 samples, each from its own chain, against
    enumeration; the tolerances are `tv_tolerance` for N independent draws (false alarm
    ≤ 1e-6 each). 100 + 11 sweeps: the last round of proposals is even, so it includes the
    target's pair 0-1 and the joint checks that a swap moves v together with h."""
    rbm, n = random_rbm(5, 5, scale=1.5, seed=11), 20000

    def make():
        return backends.get_sampler("gibbs", burn_in=100, num_sweeps=11, num_replicas=5,
                                    min_beta=0.2)

    out = make().sample(rbm, n, seed=3)
    p = from_rbm(rbm).exact_log_probs().exp()
    tv, tol = total_variation(out.states, p), tv_tolerance(p, n)
    assert tv <= tol, (tv, tol)
    check_distribution(make, rbm, n)


def test_a_target_beta_other_than_one_is_the_first_replicas():
    """beta = 0.6 with replicas: samples of exp(−0.6 E), i.e. of the model with parameters
    × 0.6, through both kernels (the full 2^10-state law, TV within `tv_tolerance`)."""
    rbm, n = random_rbm(6, 4, scale=2.0, seed=12), 20000
    scaled = random_rbm(6, 4, scale=2.0, seed=12)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(0.6)
    p = from_rbm(scaled).exact_log_probs().exp()
    for model in (rbm, from_rbm(rbm)):
        sampler = backends.get_sampler("gibbs", beta=0.6, num_replicas=4, min_beta=0.3)
        out = sampler.sample(model, n, seed=4)
        assert out.info["betas"][0] == pytest.approx(0.6)
        tv, tol = total_variation(out.states, p), tv_tolerance(p, n)
        assert tv <= tol, (type(model).__name__, tv, tol)


def test_conformance_suite_passes_with_replicas():
    """The whole suite (RBMs, a 4-partite and an odd-cycle Boltzmann machine through the
    colour kernel, conditionals, seeds, energies, bad input) with 3 replicas per chain."""
    report = run_conformance("gibbs", options={"num_replicas": 3, "min_beta": 0.4},
                             num_samples=20000)
    rows = report["distribution"] + report["bm_distribution"] + report["conditional"]
    assert rows and all("refused" not in row and row["tv"] <= row["tv_tolerance"]
                        for row in rows)


# ------------------------------------------------------------------------ two modes
def bimodal_rbm(n: int = 5, coupling: float = 3.0, tilt: float = -0.08) -> RBM:
    """n + n units, every coupling `coupling`, every bias −coupling·n/2 + tilt: the two modes
    all-off (E = 0) and all-on (E = −2n·tilt) hold 99.7 % of the mass, on : off ≈ e^{2n·tilt}
    (weights 0.31 and 0.69 here), and between them lies a barrier of ≈ coupling·n²/4 ≈ 19
    nats that block Gibbs at β = 1 does not cross in hundreds of sweeps (measured: none of
    4000 chains in 200 sweeps)."""
    rbm = RBM(n, n, init_std=0.0)
    with torch.no_grad():
        rbm.weight.fill_(coupling)
        rbm.visible_bias.fill_(-coupling * n / 2 + tilt)
        rbm.hidden_bias.fill_(-coupling * n / 2 + tilt)
    return rbm


def start_in_the_off_mode(sampler: GibbsSampler, model: RBM, n_chains: int, *,
                          bm: bool) -> None:
    """Chains (every replica) at the all-off state, as if burned in there."""
    k = sampler.options.num_replicas
    state: dict = {"generator": None}
    if bm:
        state["states"] = torch.zeros(k * n_chains, model.n_units)
    else:
        state["hidden"] = torch.zeros(k * n_chains, model.n_hidden)
    if k > 1:
        state.update(replicas=k, swap_parity=0)
    sampler.load_state_dict(state)


def on_mode_fraction(sampler: GibbsSampler, model: RBM, n_chains: int, *, bm: bool
                     ) -> tuple[float, torch.Tensor]:
    """The fraction of N = n_chains samples (one round, one sample per chain) with a majority
    of visible units on, and the visible samples."""
    target = from_rbm(model) if bm else model
    out = sampler.sample(target, n_chains, seed=5)
    assert not out.info["burned_in"]  # the chains continued from the off mode
    visible = out.states[:, : model.n_visible]
    return float((visible.sum(1) > model.n_visible / 2).double().mean()), visible


@pytest.mark.parametrize("kernel", ["rbm", "bm"])
def test_replicas_recover_the_weights_of_two_separated_modes(kernel, device="cpu"):
    """From the all-off mode, 100 sweeps: plain Gibbs still has no chain in the on mode (exact
    weight 0.31), while 8 replicas down to β = 0.1 (barrier ≈ 1.9 nats there) get its weight
    within 5 sd of N = 4000 independent chains (sd = sqrt(p(1 − p)/N) ≈ 0.0073; measured
    error ≈ 0.002) and the visible marginal within `tv_tolerance`. Fails if swaps are off
    (no chain reaches the on mode) or accepted with the wrong sign (the target replica is
    handed the hot replicas' high-energy states). Both kernels: the RBM's and, on the same
    model as a BoltzmannMachine, the colour-class kernel's."""
    rbm, n = bimodal_rbm(), 4000
    bm = kernel == "bm"
    p = exact_visible_marginal(rbm)
    index = torch.arange(2**rbm.n_visible)
    on = ((index.unsqueeze(1) >> torch.arange(rbm.n_visible)) & 1).sum(1) > rbm.n_visible / 2
    p_on = float(p[on].sum())
    assert 0.25 < p_on < 0.35 and float(p[0] + p[-1]) > 0.99  # two modes, weights ≈ 0.3/0.7
    sd = math.sqrt(p_on * (1 - p_on) / n)

    options = {"num_chains": n, "burn_in": 0, "num_sweeps": 100, "device": device}
    plain = backends.get_sampler("gibbs", **options)
    start_in_the_off_mode(plain, rbm, n, bm=bm)
    stuck, _ = on_mode_fraction(plain, rbm, n, bm=bm)
    assert stuck < 0.05, stuck

    tempered = backends.get_sampler("gibbs", **options, num_replicas=8, min_beta=0.1)
    start_in_the_off_mode(tempered, rbm, n, bm=bm)
    found, visible = on_mode_fraction(tempered, rbm, n, bm=bm)
    assert abs(found - p_on) <= 5 * sd, (found, p_on, sd)
    tv, tol = total_variation(visible, p), tv_tolerance(p, n)
    assert tv <= tol, (tv, tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_replicas_recover_the_mode_weights_on_a_gpu():
    for kernel in ("rbm", "bm"):
        test_replicas_recover_the_weights_of_two_separated_modes(kernel, device="cuda")


# -------------------------------------------------------- the option, chains, checkpoints
def call_stream(sampler: GibbsSampler, model) -> list[torch.Tensor]:
    """Samples and energies of a few calls: seeded, unseeded (the chains continue), more
    samples than chains (rounds), and a clamp (fresh chains of the conditional)."""
    out = []
    for num, seed, clamp in ((16, 0, None), (40, None, None), (16, 7, None),
                             (16, None, {0: 1, 3: 0})):
        s = sampler.sample(model, num, seed=seed, clamp=clamp)
        out += [s.states, s.energy]
    return out


@pytest.mark.parametrize("model", [random_rbm(6, 4, seed=1), from_rbm(random_rbm(5, 3, seed=2))],
                         ids=["rbm", "bm"])
@pytest.mark.parametrize("extra", [{}, {"beta": 0.8, "dtype": "float64"}])
def test_one_replica_is_plain_gibbs_bit_for_bit(model, extra):
    """num_replicas = 1 (with any min_beta) gives exactly the samples, energies and
    checkpoint of the sampler without the option: the same operations and random draws."""
    options = {"num_chains": 16, "burn_in": 7, "num_sweeps": 3, **extra}
    absent = backends.get_sampler("gibbs", **options)
    one = backends.get_sampler("gibbs", **options, num_replicas=1, min_beta=0.5)
    for a, b in zip(call_stream(absent, model), call_stream(one, model), strict=True):
        assert torch.equal(a, b)
    sa, sb = absent.state_dict(), one.state_dict()
    chain_key = "hidden" if isinstance(model, RBM) else "states"
    assert set(sa) == set(sb) == {chain_key, "generator"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "swap_acceptance" not in one.sample(model, 4).info


def test_state_has_a_row_per_replica_and_checkpoints_round_trip():
    rbm = random_rbm(6, 4, seed=3)
    options = {"num_chains": 8, "burn_in": 4, "num_sweeps": 3, **PT}
    sampler = backends.get_sampler("gibbs", **options)
    sampler.sample(rbm, 8, seed=0)  # 7 sweeps: the next round of proposals is odd
    state = sampler.state_dict()
    assert set(state) == {"hidden", "generator", "replicas", "swap_parity"}
    assert state["hidden"].shape == (4 * 8, 4)
    assert (state["replicas"], state["swap_parity"]) == (4, 1)
    clone = backends.get_sampler("gibbs", **options)
    clone.load_state_dict(state)
    a, b = sampler.sample(rbm, 24), clone.sample(rbm, 24)  # unseeded: the saved generator
    assert not b.info["burned_in"] and torch.equal(a.states, b.states)
    assert a.info["swap_acceptance"] == b.info["swap_acceptance"]
    # the parity is part of the state: restarting it at 0 changes the continuation
    wrong = backends.get_sampler("gibbs", **options)
    wrong.load_state_dict({**state, "swap_parity": 0})
    assert not torch.equal(wrong.sample(rbm, 24).states, a.states)


def test_a_boltzmann_machines_tempered_chains_round_trip():
    bm = from_rbm(random_rbm(5, 3, seed=4))
    options = {"num_chains": 6, "burn_in": 3, "num_sweeps": 2, **PT}
    sampler = backends.get_sampler("gibbs", **options)
    sampler.sample(bm, 6, seed=1)
    state = sampler.state_dict()
    assert set(state) == {"states", "generator", "replicas", "swap_parity"}
    assert state["states"].shape == (4 * 6, 8)
    clone = backends.get_sampler("gibbs", **options)
    clone.load_state_dict(state)
    a, b = sampler.sample(bm, 12), clone.sample(bm, 12)
    assert not b.info["burned_in"] and torch.equal(a.states, b.states)


def test_the_swap_parity_carries_over_from_call_to_call():
    """One call of 6 sweeps and six calls of 1 sweep draw the same random numbers (float64:
    one 64-bit word per uniform, in order); they give the same chains only if the even-odd
    alternation continues across calls instead of restarting at the even pairs."""
    rbm = random_rbm(6, 4, seed=5)
    base = {"num_chains": 8, "burn_in": 0, "dtype": "float64", "num_replicas": 3,
            "min_beta": 0.5}
    once = backends.get_sampler("gibbs", **base, num_sweeps=6).sample(rbm, 8, seed=2)
    stepwise = backends.get_sampler("gibbs", **base, num_sweeps=1)
    for call in range(6):
        out = stepwise.sample(rbm, 8, seed=2 if call == 0 else None)
    assert torch.equal(out.states, once.states)


def test_a_change_of_replica_count_restarts_the_chains_even_at_the_same_shape():
    """16 chain states are 16 chains × 1 replica, 8 × 2 or 4 × 4: a checkpoint of one is not
    burned in for another, so loading it starts fresh chains (as a change of shape does)."""
    rbm = random_rbm(6, 4, seed=6)
    fast = {"burn_in": 5, "num_sweeps": 2}
    layouts = [{"num_chains": 16}, {"num_chains": 8, "num_replicas": 2},
               {"num_chains": 4, "num_replicas": 4}]
    for source in layouts:
        sampler = backends.get_sampler("gibbs", **fast, **source)
        sampler.sample(rbm, 4, seed=0)
        state = sampler.state_dict()
        assert state["hidden"].shape == (16, 4)
        for target in layouts:
            other = backends.get_sampler("gibbs", **fast, **target)
            other.load_state_dict(state)
            fresh = other.sample(rbm, 4).info["burned_in"]
            assert fresh == (target != source), (source, target)


def test_info_reports_the_ladder_and_each_pairs_acceptance():
    rbm = random_rbm(6, 4, seed=7)
    sampler = backends.get_sampler("gibbs", num_chains=10, burn_in=5, num_sweeps=3,
                                   num_replicas=5, min_beta=0.2)
    out = sampler.sample(rbm, 25, seed=0)  # 3 rounds
    info = out.info
    assert info["num_replicas"] == 5 and info["betas"] == pytest.approx(ladder(1.0, 0.2, 5))
    acceptance = info["swap_acceptance"]
    assert len(acceptance) == 4 and all(0.0 <= a <= 1.0 for a in acceptance)
    assert info["spin_updates"] == (5 + 3 * 3) * 5 * 10 * 10  # every replica's updates
    assert {"preprocess_s", "sample_s", "postprocess_s", "total_s"} <= set(info["timing"])
    assert info["num_chains"] == 10 and len(out) == 25 and out.states.shape == (25, 10)
    energy = rbm.energy(out.visible, out.hidden).detach()
    assert torch.allclose(out.energy, energy, atol=1e-5)


@pytest.mark.parametrize("options, says", [
    ({"num_replicas": 0}, "num_replicas must be greater than or equal to 1, got 0"),
    ({"num_replicas": 65}, "num_replicas must be less than or equal to 64, got 65"),
    ({"num_replicas": True}, "num_replicas must be a valid integer, got True"),
    ({"min_beta": 0.0}, "min_beta must be greater than 0, got 0.0"),
    ({"min_beta": 1.5}, "min_beta must be less than 1, got 1.5"),
    ({"min_beta": 1.0}, "min_beta must be less than 1, got 1.0"),
    ({"min_beta": math.nan}, "min_beta must be a finite number, got nan"),
])
def test_bad_options_are_refused_in_one_line_naming_the_option(options, says):
    with pytest.raises(OptionError) as err:
        backends.get_sampler("gibbs", **options)
    message, field = str(err.value), next(iter(options))
    assert message.startswith(f"backend 'gibbs' option {field} ") and "\n" not in message
    assert says in message and f"({field}: " in message and err.value.option == field
    with pytest.raises(OptionError):  # the work model checks the same way
        GibbsSampler.work(options, ProblemShape(6, 4, 24), 10)


@pytest.mark.parametrize("state, says", [
    ({"hidden": None, "replicas": 0}, "sampler state 'replicas' must be an int from 1 to 64"),
    ({"hidden": None, "replicas": True}, "sampler state 'replicas' must be an int"),
    ({"hidden": None, "replicas": 2, "swap_parity": 2}, "'swap_parity' must be 0 or 1"),
])
def test_a_damaged_replica_state_is_refused_and_changes_nothing(state, says):
    rbm = random_rbm(6, 4, seed=3)
    sampler = backends.get_sampler("gibbs", num_chains=4, burn_in=3, num_sweeps=1, **PT)
    sampler.sample(rbm, 4, seed=0)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=re.escape(says)):
        sampler.load_state_dict(state)
    after = sampler.state_dict()
    assert torch.equal(after["hidden"], before["hidden"])
    assert (after["replicas"], after["swap_parity"]) == (before["replicas"],
                                                          before["swap_parity"])


# ------------------------------------------------------------------------- the cost
def test_work_and_memory_count_every_replica():
    shape, cls = ProblemShape(6, 4, 24), GibbsSampler
    base = {"num_chains": 100, "burn_in": 10, "num_sweeps": 5}
    plain = cls.work(base, shape, 300)
    tempered = cls.work({**base, "num_replicas": 8}, shape, 300)
    steps = 10 + 3 * 5
    per_state, overhead = cls.STEP_COST * cls.EXCHANGE_COST, cls.STEP_OVERHEAD + \
        cls.EXCHANGE_OVERHEAD
    assert tempered["work"].value == pytest.approx(steps * (per_state * 8 * 100 * 34 + overhead))
    assert tempered["work"].value > 8 * plain["work"].value - steps * cls.STEP_OVERHEAD * 8
    assert "num_replicas" in tempered["work"].options
    assert "num_chains 100 × num_replicas 8" in tempered["work"].formula
    assert tempered["state_bytes"].value > 8 * (plain["state_bytes"].value - 5 * 2**20)
    assert "num_replicas" in tempered["state_bytes"].options


def test_absurd_replica_memory_is_refused_by_the_sampler():
    sampler = backends.get_sampler("gibbs", num_chains=10**8, num_replicas=64)
    with pytest.raises(ValueError, match=r"num_chains=100000000 × num_replicas=64 .*GiB"):
        sampler.sample(random_rbm(6, 4, seed=0), 4, seed=0)


def test_a_service_prices_the_replicas_against_its_work_limit():
    """A request the service's max_work admits with one replica is refused (413, naming
    num_replicas) with 64: replicas cannot buy more work than the limits allow."""
    key = "tempering-test-key-1"
    rbm = random_rbm(6, 4, seed=1)
    body = {"backend": "gibbs", "num_samples": 1000, "seed": 0,
            "rbm": {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                    "hidden_bias": rbm.hidden_bias.tolist()}}
    plain = {"num_chains": 1000, "burn_in": 10, "num_sweeps": 10}
    limit = 2 * GibbsSampler.work(plain, ProblemShape(6, 4, 24), 1000)["work"].value
    headers = {"Authorization": f"Bearer {key}"}
    with running_service({"keys": [{"key": key}], "limits": {"max_work": limit}}) as url:
        ok = httpx.post(f"{url}/v1/sample", json={**body, "options": plain}, headers=headers,
                        timeout=60)
        assert ok.status_code == 200, ok.text
        r = httpx.post(f"{url}/v1/sample", json={**body, "options": {**plain,
                                                                      "num_replicas": 64}},
                       headers=headers, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["limit"] == "max_work" and "num_replicas" in r.json()["options"]
        assert "num_replicas 64" in r.json()["detail"]
