"""The pieces of the `dwave` backend on their own: β tracker, program object, retry helper,
options model, spin form. (The backend as a whole: tests/test_dwave.py.)"""

import dataclasses
import math

import dimod
import numpy as np
import pytest
import torch

from backends.dwave import DWaveBackend, DWaveOptions, logical_ising
from backends.dwave_embedding import Embedding
from backends.dwave_temperature import (
    BETA_GUESS,
    BETA_MEMORY,
    CALIBRATION_ROUNDS,
    BetaEstimate,
    BetaTracker,
    QPUProgram,
    mpl_beta,
    mpl_estimate,
    program_problem,
)
from backends.options import OptionError
from backends.retry import RetryableResult, call_with_retries
from backends.testing import random_rbm
from qvae import RBM

PRIOR = BetaTracker.PRIOR  # (0.3 · 5)^-2


# ---------------------------------------------------------------------------- β tracker
def test_calibration_combines_each_round_with_the_prior_until_rounds_run_out():
    t = BetaTracker()
    assert t.beta is None and t.init() == BETA_GUESS
    # each estimate carries the prior's information: β̂ moves halfway from 5 to the estimate
    assert t.update(BetaEstimate(6.0, PRIOR)) == pytest.approx(5.5)
    assert t.update(BetaEstimate(5.5, PRIOR)) == pytest.approx(5.25)  # moved 4.5% > 2%
    assert t.update(BetaEstimate(5.25, PRIOR)) is None  # third round: done
    assert t.beta is None  # nothing is settled before final
    cal = t.final()
    assert CALIBRATION_ROUNDS == 3 and (cal.rounds, cal.betas) == (3, [6.0, 5.5, 5.25])
    assert t.beta == pytest.approx(5.125) and t.information == pytest.approx(2 * PRIOR)
    assert cal.relative_se == pytest.approx(1 / (5.125 * math.sqrt(2 * PRIOR)))


def test_calibration_stops_when_self_consistent_or_uninformative():
    t = BetaTracker()
    beta = t.init()
    assert t.update(BetaEstimate(beta * 1.01, 1e9)) is None  # within 2% of the β programmed
    assert t.final().rounds == 1 and t.beta == pytest.approx(beta * 1.01, rel=1e-6)
    t.init()
    assert t.update(None) is None  # the samples said nothing: keep the prior
    cal = t.final()
    assert (cal.rounds, cal.betas, t.beta, t.information) == (1, [None], BETA_GUESS, PRIOR)


def test_refine_is_precision_weighted_and_forgets_and_reset_returns_to_the_option():
    t = BetaTracker(6.0)
    t.information = 100.0
    t.refine(BetaEstimate(7.0, 10.0))
    info = BETA_MEMORY * 100.0 + 10.0
    assert t.information == pytest.approx(info) and t.beta == pytest.approx(6.0 + 10.0 / info)
    t.reset()
    assert (t.beta, t.information) == (6.0, 0.0)
    with pytest.raises(RuntimeError, match="before init"):
        BetaTracker().update(BetaEstimate(5.0, 1.0))
    with pytest.raises(RuntimeError, match="before calibration"):
        BetaTracker().refine(BetaEstimate(5.0, 1.0))


def test_mpl_estimate_always_returns_an_estimate_and_mpl_beta_a_float():
    rng = np.random.default_rng(0)
    fields = rng.normal(size=(2000, 6))
    spins = np.where(rng.random(fields.shape) < 1 / (1 + np.exp(-2 * 2.0 * -fields)), 1.0, -1.0)
    est = mpl_estimate(spins, fields)
    assert isinstance(est, BetaEstimate) and abs(est.beta / 2.0 - 1) < 0.1
    assert est.information > 0 and mpl_beta(spins, fields) == est.beta
    ordered = -np.sign(fields)  # perfectly ordered: the bound, with no information
    assert mpl_estimate(ordered, fields) == BetaEstimate(1e3, 0.0)
    assert isinstance(mpl_beta(ordered, fields), float)


# ----------------------------------------------------------------------- program object
def test_program_bqm_and_its_spin_reversal_transform():
    rng = np.random.default_rng(1)
    program = QPUProgram(rng.normal(size=4), np.array([0, 1, 2]), np.array([1, 2, 3]),
                         rng.normal(size=3))
    labels = [10, 11, 12, 13]
    bqm = program.bqm(labels)
    assert bqm.vartype is dimod.SPIN and list(bqm.variables) == labels
    assert bqm.get_quadratic(11, 12) == program.j[1] and bqm.get_linear(13) == program.h[3]
    gauge = np.array([1.0, -1.0, -1.0, 1.0])
    gauged = program.bqm(labels, gauge)
    spins = np.where(rng.random((20, 4)) < 0.5, -1, 1)
    # s → g·s maps the gauged problem's states onto the original's, energy for energy
    assert np.allclose(gauged.energies((spins * gauge.astype(int), labels)),
                       bqm.energies((spins, labels)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        program.clipped = 1  # type: ignore[misc]


def test_program_problem_scales_embeds_and_clips():
    # one visible unit on qubit 10, one hidden unit on the chain 11-12
    emb = Embedding({0: [10], 1: [11, 12]}, 2, np.array([[0, 1]]), [(10, 11), (11, 12)])
    h, j = np.array([1.0, -3.0]), np.array([0.5])
    program = program_problem(h, j, emb, 1.0, 1.0, (-2.0, 2.0), (-1.0, 1.0), 4.0)
    assert isinstance(program, QPUProgram) and np.allclose(program.h, [1.0, -1.5, -1.5])
    assert (program.clipped, program.clip_ratio) == (0, 0.75)  # the chain shares h
    with pytest.warns(UserWarning, match=r"2 of 4 programmed terms .* factor 1\.5; clipped"):
        program = program_problem(h, j, emb, 1.0, 0.5, (-2.0, 2.0), (-1.0, 1.0), 4.0)
    assert (program.clipped, program.clip_ratio) == (2, 1.5)  # E/β at β = 0.5
    assert np.allclose(program.h, [2.0, -2.0, -2.0]) and program.j[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_clip_ratio"):
        program_problem(h, j, emb, 1.0, 0.5, (-2.0, 2.0), (-1.0, 1.0), 1.2)


# ------------------------------------------------------------------------- retry helper
class Flaky:
    def __init__(self, failures, exc=TimeoutError):
        self.calls, self.failures, self.exc = 0, failures, exc

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return "ok"


def test_retry_counts_retries_and_bounds_the_backoff():
    waits, retried = [], []
    fn = Flaky(failures=5)
    out = call_with_retries(fn, max_retries=5, backoff_s=1.0, max_backoff_s=5.0,
                            retryable=lambda e: isinstance(e, TimeoutError),
                            on_retry=retried.append, sleep=waits.append)
    assert out == "ok" and fn.calls == 6 and len(retried) == 5
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped


def test_retry_gives_up_after_max_retries_and_passes_other_errors_at_once():
    waits = []
    fn = Flaky(failures=10)
    with pytest.raises(TimeoutError, match="failure 3"):  # the last failure, attempt 3
        call_with_retries(fn, max_retries=2, backoff_s=0.5,
                          retryable=lambda e: isinstance(e, TimeoutError), sleep=waits.append)
    assert fn.calls == 3 and waits == [0.5, 1.0]
    other = Flaky(failures=10, exc=KeyError)
    with pytest.raises(KeyError):
        call_with_retries(other, max_retries=5, backoff_s=0.5,
                          retryable=lambda e: isinstance(e, TimeoutError), sleep=waits.append)
    assert other.calls == 1 and waits == [0.5, 1.0]  # no retry, no wait


def test_retry_of_a_result_and_a_server_given_delay():
    answers = iter([503, 503, 200])
    waits = []

    def request():
        code = next(answers)
        if code != 200:
            raise RetryableResult(code)
        return code

    hint = lambda e: 7.0 if isinstance(e, RetryableResult) else None  # noqa: E731
    assert call_with_retries(request, max_retries=3, backoff_s=1.0, delay_hint=hint,
                             retryable=lambda e: isinstance(e, RetryableResult),
                             sleep=waits.append) == 200
    assert waits == [7.0, 7.0]
    with pytest.raises(RetryableResult) as info:
        call_with_retries(lambda: (_ for _ in ()).throw(RetryableResult(502)), max_retries=0,
                          backoff_s=1.0, retryable=lambda e: True, sleep=waits.append)
    assert info.value.value == 502 and waits == [7.0, 7.0]


# ------------------------------------------------------------------------ options model
@pytest.mark.parametrize("name, value", [
    ("mode", "hybrid"), ("solver", 3), ("on_budget", "later"), ("topology", "torus"),
    ("emulator_sampler", "exact"), ("emulator_sweeps", 10**7), ("emulator_sweeps", 0),
    ("max_clip_ratio", 0.5), ("retry_backoff_s", -1.0), ("max_retries", -1),
    ("beta_every", 1.5), ("calibration_reads", True), ("beta_eff", float("nan")),
    ("chain_strength", 0.0), ("qpu_time_budget_s", -5.0), ("embedding_timeout", 0),
    ("emulated_beta", float("inf")), ("num_spin_reversal_transforms", -2),
    ("native_qubits", [1, 2]), ("native_qubits", ([0, 1], [2, True])),
    ("topology_shape", 0), ("topology_shape", [4, "x"]), ("strict", "yes"),
])
def test_bad_options_are_refused_in_one_line_naming_the_option(name, value):
    with pytest.raises(OptionError) as info:
        DWaveBackend(**{name: value})
    msg = str(info.value)
    assert "\n" not in msg and f"option {name}" in msg and f"got {value!r}" in msg


def test_options_are_read_from_the_model():
    s = DWaveBackend(solver="emulator", native_qubits=[np.array([1, 2]), (3,)], beta_eff=6)
    assert isinstance(s.options, DWaveOptions) and s.options.beta_eff == 6.0
    assert s.native_qubits == ([1, 2], [3]) and s.beta == 6.0 and s.emulated
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['sweeps'\]"):
        DWaveBackend(sweeps=3)
    shape = type("Shape", (), {"size": 100})()
    assert DWaveBackend.work(DWaveOptions(solver="emulator"), shape, 10) == DWaveBackend.work(
        {"solver": "emulator"}, shape, 10)


# --------------------------------------------------------------------------- spin form
def test_logical_ising_is_the_spin_form_of_rbm_to_ising():
    rbm = random_rbm(5, 4, seed=2)
    with torch.no_grad():
        rbm.weight[0, 1] = 0.0  # a missing coupling
    h, w = logical_ising(rbm)
    lin, quad, _ = rbm.to_ising()
    assert np.array_equal(h, [lin[i] for i in range(9)])
    assert np.array_equal(-w / 4, [[quad.get((i, 5 + j), quad.get((5 + j, i), 0.0))
                                    for j in range(4)] for i in range(5)])
    b, c = (p.detach().double().numpy() for p in (rbm.visible_bias, rbm.hidden_bias))
    wt = rbm.weight.detach().double().numpy()
    assert np.allclose(h, np.concatenate([-b / 2 - wt.sum(1) / 4, -c / 2 - wt.sum(0) / 4]))
    masked = RBM(3, 2, mask=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), seed=0)
    assert np.array_equal(logical_ising(masked)[1],
                          masked.effective_weight().detach().double().numpy())
    with pytest.raises(ValueError, match="all zeros"):
        logical_ising(RBM(3, 2, init_std=0.0))
