"""The chain shell (backends/chains.py) shared by `gibbs`, `langevin` and `mala`, the step-size
adaptation (backends/adaptation.py), and their options models."""

from __future__ import annotations

import doctest
import math
import re

import pytest
import torch

import backends
from backends import adaptation as adaptation_module
from backends import chains as chains_module
from backends._langevin_kernels import TARGET_ACCEPTANCE, MALAInfo, init_state, mala_steps
from backends.adaptation import StepSizeAdaptation
from backends.base import ProblemShape
from backends.chains import ChainOptions, Chains, Plan, burn_in, run_rounds
from backends.gibbs import GibbsOptions, GibbsSampler
from backends.langevin import LangevinOptions, LangevinSampler
from backends.mala import MALAOptions, MALASampler
from backends.options import OptionError
from backends.testing import random_rbm

FAST = {  # small runs of each chain backend
    "gibbs": {"burn_in": 5, "num_sweeps": 2},
    "langevin": {"burn_in": 20, "num_steps": 3, "num_threads": 1},
    "mala": {"burn_in": 20, "num_steps": 3, "num_threads": 1},
}
#: What each backend's checkpoint state is made of: the same keys as before the shell existed,
#: so that checkpoints written by earlier versions (e.g. benchmarks/paper/runs/*/last.pt) load.
STATE_KEYS = {"gibbs": {"hidden", "generator"}, "langevin": {"position", "generator"},
              "mala": {"position", "generator", "step_size"}}


def test_module_examples():
    for module in (chains_module, adaptation_module):
        assert doctest.testmod(module).failed == 0, module.__name__


# ------------------------------------------------------------------- rounds arithmetic
@pytest.mark.parametrize("num_chains, num_samples, n_chains, rounds", [
    (None, 7, 7, 1), (4, 4, 4, 1), (4, 10, 4, 3), (4, 12, 4, 3), (4, 13, 4, 4), (16, 3, 16, 1),
])
def test_plan_splits_a_call_into_chains_and_rounds(num_chains, num_samples, n_chains, rounds):
    plan = Plan.of(num_chains, num_samples)
    assert (plan.n_chains, plan.rounds) == (n_chains, rounds)
    assert plan.rounds * plan.n_chains >= num_samples > (plan.rounds - 1) * plan.n_chains
    assert plan.steps(burn_in=5, per_round=2) == 5 + 2 * rounds
    assert plan.steps(burn_in=5, per_round=2, fresh=False) == 2 * rounds


@pytest.mark.parametrize("name", ["gibbs", "langevin", "mala"])
def test_sampler_and_work_model_use_the_same_plan(name):
    cls = backends.registry.sampler_class(name)
    rbm = random_rbm(6, 4, seed=0)
    options = {**FAST[name], "num_chains": 4}
    out = backends.get_sampler(name, **options).sample(rbm, 10, seed=0)
    assert len(out) == 10 and out.info["rounds"] == 3 and out.info["num_chains"] == 4
    work = cls.work(options, ProblemShape(6, 4, 24), 10)["work"]
    per_round = options[cls.round_option]
    steps = options["burn_in"] + 3 * per_round
    assert work.value == pytest.approx(steps * (cls.STEP_COST * 4 * 34 + cls.STEP_OVERHEAD))
    assert f"3 round(s) × {cls.round_option} {per_round}" in work.formula


def test_burn_in_and_rounds_drive_any_kernel():
    calls = []

    def advance(gen, state, params, k):  # state counts the steps taken
        calls.append(k)
        return state + params * k, state

    assert burn_in(advance, None, 0, 1, 0) == (0, 1, {}) and calls == []  # no burn-in: no call
    state, params, info = burn_in(advance, None, 0, 1, 5)
    assert (state, params, info, calls) == (5, 1, {}, [5])
    state, runs = run_rounds(advance, None, 5, 1, 3, 2)
    assert state == 11 and [s for s, _ in runs] == [7, 9, 11] and calls == [5, 2, 2, 2]


# ------------------------------------------------------------- persistent / fresh logic
def test_chains_continue_on_the_same_shape_and_restart_on_another():
    chains = Chains(ChainOptions(), key="position", defaults={"step_size": 0.1})
    assert chains.resume((4, 3)) is None  # nothing kept
    chains.keep(torch.ones(4, 3), step_size=0.5)
    kept = chains.resume((4, 3))
    assert torch.equal(kept["position"], torch.ones(4, 3)) and kept["step_size"] == 0.5
    assert chains.resume((5, 3)) is None and chains.resume((4, 2)) is None  # other shapes
    chains.reset()
    assert chains.resume((4, 3)) is None and chains.state_dict()["step_size"] == 0.1
    fresh_every_call = Chains(ChainOptions(persistent=False), key="hidden")
    fresh_every_call.keep(torch.ones(4, 3))
    assert fresh_every_call.resume((4, 3)) is None


def test_a_seed_gives_a_fresh_generator_and_no_seed_continues_it():
    chains = Chains(ChainOptions(), key="hidden")
    first = chains.generator(3)
    assert chains.generator(None) is first
    again = chains.generator(3)
    assert again is not first and torch.equal(again.get_state(), torch.Generator()
                                              .manual_seed(3).get_state())


@pytest.mark.parametrize("name", ["gibbs", "langevin", "mala"])
def test_backends_burn_in_fresh_chains_only(name):
    rbm, other = random_rbm(6, 4, seed=1), random_rbm(5, 3, seed=2)  # both layers differ
    sampler = backends.get_sampler(name, **FAST[name], num_chains=8)
    assert sampler.sample(rbm, 8, seed=0).info["burned_in"]
    assert not sampler.sample(rbm, 8).info["burned_in"]  # same shape: the chains continue
    assert not sampler.sample(rbm, 20).info["burned_in"]  # more samples: more rounds, same chains
    assert sampler.sample(other, 8).info["burned_in"]  # new shape: fresh chains, burned in
    assert not sampler.sample(other, 8).info["burned_in"]
    one_per_sample = backends.get_sampler(name, **FAST[name])  # num_chains = num_samples
    one_per_sample.sample(rbm, 8, seed=0)
    assert one_per_sample.sample(rbm, 9).info["burned_in"]  # 9 chains now: fresh
    fresh = backends.get_sampler(name, **FAST[name], num_chains=8, persistent=False)
    assert all(fresh.sample(rbm, 8, seed=s).info["burned_in"] for s in (0, 1))
    assert fresh.state_dict()[fresh.chain_key] is None  # nothing kept


def test_gibbs_spin_updates_count_burn_in_only_for_fresh_chains():
    rbm = random_rbm(6, 4, seed=1)
    sampler = backends.get_sampler("gibbs", num_chains=4, burn_in=5, num_sweeps=2)
    assert sampler.sample(rbm, 10, seed=0).info["spin_updates"] == (5 + 3 * 2) * 4 * 10
    assert sampler.sample(rbm, 10).info["spin_updates"] == 3 * 2 * 4 * 10


# ------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("name", ["gibbs", "langevin", "mala"])
def test_state_dict_round_trip(name):
    rbm = random_rbm(6, 4, seed=3)
    sampler = backends.get_sampler(name, **FAST[name], num_chains=8)
    assert set(sampler.state_dict()) == STATE_KEYS[name]  # also before any call
    sampler.sample(rbm, 8, seed=0)
    state = sampler.state_dict()
    assert set(state) == STATE_KEYS[name]
    assert state[sampler.chain_key].shape[0] == 8 and state[sampler.chain_key].device.type == "cpu"
    clone = backends.get_sampler(name, **FAST[name], num_chains=8)
    clone.load_state_dict(state)
    a, b = sampler.sample(rbm, 16), clone.sample(rbm, 16)  # unseeded: the saved generator
    assert not b.info["burned_in"] and torch.equal(a.states, b.states)
    if name == "mala":
        assert b.info["step_size"] == a.info["step_size"] == state["step_size"]
    # a state of another dtype is converted to the sampler's
    wide = backends.get_sampler(name, **FAST[name], num_chains=8, dtype="float64")
    wide.load_state_dict(state)
    assert wide.state_dict()[sampler.chain_key].dtype == torch.float64


@pytest.mark.parametrize("state, says", [
    ({"hidden": "not a tensor"}, "sampler state 'hidden' must be a finite float tensor"),
    ({"hidden": torch.full((4, 3), math.nan)}, "sampler state 'hidden' must be a finite"),
    ({"hidden": torch.zeros(12)}, "of shape (chains, units)"),
    ({"hidden": None, "generator": torch.zeros(3, dtype=torch.uint8)},
     "sampler state 'generator' is not a torch.Generator state"),
])
def test_a_damaged_checkpoint_state_is_refused_by_name_and_changes_nothing(state, says):
    rbm = random_rbm(6, 4, seed=3)
    sampler = backends.get_sampler("gibbs", **FAST["gibbs"], num_chains=4)
    sampler.sample(rbm, 4, seed=0)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=re.escape(says)):
        sampler.load_state_dict(state)
    after = sampler.state_dict()
    assert torch.equal(after["hidden"], before["hidden"])
    assert torch.equal(after["generator"], before["generator"])


def test_a_damaged_step_size_is_refused():
    sampler = backends.get_sampler("mala", num_chains=4)
    for bad in ("0.1", -1.0, math.inf, True):
        with pytest.raises(ValueError, match="sampler state 'step_size' must be a finite number"):
            sampler.load_state_dict({"position": None, "step_size": bad})
    assert sampler.state_dict()["step_size"] == 0.1


def test_mala_step_size_travels_with_its_chains():
    rbm = random_rbm(6, 4, seed=1)
    sampler = backends.get_sampler("mala", step_size=2.0, burn_in=100, num_steps=3,
                                   num_chains=16)
    adapted = sampler.sample(rbm, 16, seed=0).info["step_size"]
    assert adapted != 2.0 and sampler.state_dict()["step_size"] == adapted
    assert sampler.sample(rbm, 16).info["step_size"] == adapted
    sampler.reset()  # chains and their step size go back to the start
    assert sampler.state_dict()["step_size"] == 2.0
    old_format = {"position": None, "generator": None}  # no step_size: the option's value
    clone = backends.get_sampler("mala", step_size=2.0, num_chains=16)
    clone.load_state_dict(old_format)
    assert clone.state_dict()["step_size"] == 2.0


# ------------------------------------------------------------------------- adaptation
def test_adaptation_reaches_the_target_acceptance_of_mala_on_a_gaussian():
    """MALA on N(0, I_10): acceptance falls continuously from 1 to 0 as Δt grows, so the
    target is reachable; the adapted Δt, used fixed afterwards, accepts at the target rate."""
    gen = torch.Generator().manual_seed(0)

    def gaussian(x):
        return -0.5 * (x * x).sum(-1), -x

    def advance(g, state, step, k):
        return mala_steps(g, state, gaussian, step, k)

    start = init_state(torch.randn(4000, 10, generator=gen, dtype=torch.float64), gaussian)
    adapt = StepSizeAdaptation(target=TARGET_ACCEPTANCE)
    state, step, info = burn_in(advance, gen, start, 5.0, 300, adapt)
    assert 0.2 < step < 2.0 and abs(info["burn_in_acceptance"] - TARGET_ACCEPTANCE) < 0.1
    _, runs = run_rounds(advance, gen, state, step, 1, 50)
    acceptance = float(runs[0][1].num_accepted) / (50 * 4000)
    assert abs(acceptance - TARGET_ACCEPTANCE) < 0.03, (step, acceptance)


def test_adaptation_init_update_final():
    adapt = StepSizeAdaptation(target=0.5)
    state = adapt.init(4.0)
    assert adapt.params(state) == pytest.approx(4.0) and adapt.final(state) == (4.0, {})
    for _ in range(300):  # acceptance 1 / (1 + Δt): the target 0.5 is reached at Δt = 1
        p = torch.tensor([1 / (1 + adapt.params(state))])
        state = adapt.update(state, MALAInfo(p, p > 0.5))
    step, info = adapt.final(state)
    assert step == pytest.approx(1.0, abs=0.02) and state.iteration == 300
    assert 0.4 < info["burn_in_acceptance"] < 0.5  # the early, too-large steps count too
    off = StepSizeAdaptation(target=0.5, enabled=False)
    frozen = off.init(4.0)
    for _ in range(3):
        frozen = off.update(frozen, MALAInfo(torch.tensor([0.2, 0.4]), torch.tensor([0, 1])))
    assert off.final(frozen) == (4.0, {"burn_in_acceptance": pytest.approx(0.3)})


# ---------------------------------------------------------------------- options models
def test_options_models_are_declared_and_extend_each_other():
    assert GibbsSampler.Options is GibbsOptions and LangevinSampler.Options is LangevinOptions
    assert MALASampler.Options is MALAOptions and issubclass(MALAOptions, LangevinOptions)
    assert all(issubclass(m, ChainOptions) for m in (GibbsOptions, LangevinOptions))
    for model in (GibbsOptions, LangevinOptions, MALAOptions):
        assert all(f.description for f in model.model_fields.values()), model
    assert MALAOptions().tau == 0.01 and LangevinOptions().tau == 0.02
    assert GibbsSampler().options.num_sweeps == 10


@pytest.mark.parametrize("name, options, says", [
    ("gibbs", {"num_sweeps": 0}, "num_sweeps must be greater than or equal to 1, got 0"),
    ("gibbs", {"beta": -1.0}, "beta must be greater than 0, got -1.0"),
    ("gibbs", {"beta": math.inf}, "beta must be a finite number, got inf"),
    ("gibbs", {"dtype": "float16"}, "dtype must be 'float32' or 'float64', got 'float16'"),
    ("gibbs", {"num_chains": True}, "num_chains"),
    ("gibbs", {"device": "tpu"}, "device must be 'cpu' or 'cuda[:N]', got 'tpu'"),
    ("gibbs", {"device": "meta"}, "device must be 'cpu' or 'cuda[:N]', got 'meta'"),
    ("langevin", {"burn_in": -1}, "burn_in must be greater than or equal to 0, got -1"),
    ("langevin", {"num_threads": 0}, "num_threads must be greater than or equal to 1"),
    ("langevin", {"persistent": "yes"}, "persistent must be a valid boolean, got 'yes'"),
    ("langevin", {"tau": 0.0}, "tau must be greater than 0, got 0.0"),
    ("mala", {"target_acceptance": 1.0}, "target_acceptance must be less than 1, got 1.0"),
    ("mala", {"precondition": -1.0}, "precondition must be greater than or equal to 0"),
    ("mala", {"extended": 1}, "extended must be a valid boolean, got 1"),
    ("mala", {"step_size": math.nan}, "step_size must be a finite number, got nan"),
])
def test_options_refuse_bad_values_in_one_line(name, options, says):
    with pytest.raises(OptionError) as err:
        backends.get_sampler(name, **options)
    message = str(err.value)
    assert says in message and "\n" not in message
    assert message.startswith(f"backend {name!r} option ")
    field = next(iter(options))
    assert f"({field}: " in message  # the option's description: what it does and its limits
    cls = backends.registry.sampler_class(name)
    with pytest.raises(OptionError):  # the work model checks the same way
        cls.work(options, ProblemShape(6, 4, 24), 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_with_the_fix():
    with pytest.raises(OptionError, match=r"option device asks for CUDA, which is not "
                       r"available here; use 'cpu', got 'cuda'"):
        backends.get_sampler("mala", device="cuda")


def test_a_client_may_ask_a_remote_server_for_its_gpu():
    """The options model checks the value's form only; whether this machine has the GPU is
    checked where the chains are built, so a CPU-only `remote` client can target a GPU server."""
    from backends.remote import RemoteSampler

    opts = RemoteSampler.parse_options({"url": "http://127.0.0.1:8700", "target": "gibbs",
                                        "options": {"device": "cuda:0"}})
    assert opts.options == {"device": "cuda:0"}
    with pytest.raises(OptionError, match="must be 'cpu' or 'cuda"):
        RemoteSampler.parse_options({"url": "http://127.0.0.1:8700", "target": "gibbs",
                                     "options": {"device": "tpu"}})
