"""The chain shell: what every persistent-chain backend (`gibbs`, `langevin`, `mala`) shares.

A chain backend is a kernel, a plain function of tensors that runs k steps of every chain,
`advance(generator, state, params, k) -> (state, info)` (`gibbs_sweeps`, `ula_steps`,
`mala_steps`), plus this shell, which owns the rest once:

- options every chain backend has (`ChainOptions`: burn-in, chains, persistence, device, dtype),
  checked by the options model only;
- the split of a call into chains and rounds (`Plan`: `n_chains` chains, `rounds` rounds of
  `num_steps` steps each, `replicas` copies of each chain for replica exchange), derived once
  and used by both the sampler and its work model;
- the generator: a seed gives a fresh one, no seed continues the last one;
- the persistent chains (`Chains`): chains of the same shape continue (PCD); a new shape, no
  chains yet, or `persistent=False` start fresh chains, which are burned in; the kept state
  goes into and comes back from checkpoints (`state_dict` / `load_state_dict`);
- the burn-in, optionally driving an adaptation (`init / update / final`,
  `backends.adaptation`), and the rounds.

>>> o = ChainOptions(num_chains=4)
>>> Plan.of(o.num_chains, 10)
Plan(n_chains=4, rounds=3, replicas=1)
>>> chains = Chains(o, key="position")
>>> chains.resume((4, 3)) is None  # nothing kept yet: fresh chains
True
>>> chains.keep(torch.zeros(4, 3))
>>> chains.resume((4, 3))["position"].shape, chains.resume((5, 3))
(torch.Size([4, 3]), None)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
from pydantic import field_validator

from backends.base import Cost, ProblemShape, Sampler, check_state_bytes, make_generator
from backends.options import BackendOptions, Field, OptionError

DTYPES = {"float32": torch.float32, "float64": torch.float64}

S = TypeVar("S")
P = TypeVar("P")


class ChainOptions(BackendOptions):
    """The options of every persistent-chain backend (each backend adds its kernel's)."""

    burn_in: int = Field(100, ge=0, description="kernel steps run once when chains are "
                         "(re)initialised, before the first samples")
    num_chains: int | None = Field(None, ge=1, description="parallel chains; None means one "
                                   "chain per requested sample (more samples than chains are "
                                   "taken in rounds, one round of kernel steps apart)")
    persistent: bool = Field(True, description="keep the chains across calls (PCD; burn-in is "
                             "paid once per shape); false starts fresh chains every call")
    device: str = Field("cpu", description="where the chains run: 'cpu' or 'cuda[:N]'")
    dtype: Literal["float32", "float64"] = Field("float32", description="precision of the "
                                                 "chain state and the kernel's arithmetic")

    @field_validator("device")
    @classmethod
    def _device_is_here(cls, value: str) -> str:
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError("must be 'cpu' or 'cuda[:N]'") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError("must be 'cpu' or 'cuda[:N]'")
        # whether this machine has that GPU is checked where the chains are built
        # (`device_here`), not here: a `remote` client checks a GPU server's options too
        return value


def device_here(backend: str, value: str) -> torch.device:
    """The chains' device, refused (one line) when this machine does not have it."""
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"backend {backend!r} option device asks for CUDA, which is not "
                          f"available here; use 'cpu', got {value!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OptionError(f"backend {backend!r} option device names a GPU this machine does "
                          f"not have (it has {torch.cuda.device_count()}); use 'cuda:0', "
                          f"got {value!r}")
    return device


@dataclass(frozen=True)
class Plan:
    """How one call of `num_samples` samples runs: `n_chains` chains for `rounds` rounds (the
    samples of round r are the chain states after r + 1 rounds of steps; extras are dropped).
    With replica exchange each chain runs as `replicas` states at different temperatures (the
    samples come from one of them): the kernel runs `rows` states, and the work is that many."""

    n_chains: int
    rounds: int
    replicas: int = 1

    @classmethod
    def of(cls, num_chains: int | None, num_samples: int, replicas: int = 1) -> Plan:
        n_chains = num_chains or num_samples
        return cls(n_chains, -(-num_samples // n_chains), replicas)

    @property
    def rows(self) -> int:
        """Chain states the kernel runs: n_chains × replicas."""
        return self.n_chains * self.replicas

    def steps(self, burn_in: int, per_round: int, fresh: bool = True) -> int:
        """Kernel steps of one call: the burn-in (fresh chains only) and every round's."""
        return (burn_in if fresh else 0) + self.rounds * per_round


class Chains:
    """The persistent chains of one sampler, with their generator, device and dtype.

    The kept state is one tensor of chain states, named `key` in `state_dict` ("hidden" for
    `gibbs`, "position" for `langevin` and `mala`), plus numbers that belong to those chains
    (`defaults`: e.g. MALA's adapted step size), back at their defaults whenever chains restart.
    """

    def __init__(self, options: ChainOptions, *, key: str,
                 defaults: Mapping[str, float] | None = None) -> None:
        self.persistent = options.persistent
        self.device, self.dtype = torch.device(options.device), DTYPES[options.dtype]
        self.key, self._defaults = key, dict(defaults or {})
        self._generator: torch.Generator | None = None
        self.reset()

    def generator(self, seed: int | None) -> torch.Generator:
        """A fresh generator for a seed; without one, the last generator continues (so unseeded
        calls after a seeded one are reproducible too)."""
        if seed is not None or self._generator is None:
            self._generator = make_generator(seed, self.device)
        return self._generator

    def resume(self, shape: tuple[int, ...]) -> dict[str, Any] | None:
        """The kept chains (`{key: states, **numbers}`) if they can continue with this shape;
        None when fresh chains must start (not persistent, nothing kept, or a new shape)."""
        states = self._kept[self.key]
        if not self.persistent or states is None or tuple(states.shape) != tuple(shape):
            return None
        return dict(self._kept)

    def keep(self, states: torch.Tensor, **numbers: float) -> None:
        """Keep the chains' states (and their numbers) for the next call, if persistent."""
        if self.persistent:
            self._kept = {**self._kept, self.key: states, **numbers}

    def reset(self) -> None:
        self._kept: dict[str, Any] = {self.key: None, **self._defaults}

    def state_dict(self) -> dict[str, Any]:
        states = self._kept[self.key]
        return {self.key: None if states is None else states.cpu(),
                "generator": None if self._generator is None else self._generator.get_state(),
                **{name: self._kept[name] for name in self._defaults}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (also one written before the shell existed: same keys).
        A checkpoint is data from elsewhere: values of the wrong kind are refused by name."""
        states, numbers = state.get(self.key), {}
        if states is not None and not (isinstance(states, torch.Tensor) and states.ndim == 2
                                       and states.is_floating_point()
                                       and bool(states.isfinite().all())):
            raise ValueError(f"sampler state {self.key!r} must be a finite float tensor of shape "
                             "(chains, units); the checkpoint is damaged or from another backend")
        for name in self._defaults:
            value = state.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                        0 < value < float("inf")):
                    raise ValueError(f"sampler state {name!r} must be a finite number > 0, got "
                                     f"{value!r}; the checkpoint is damaged")
                numbers[name] = float(value)
        generator = None
        if state.get("generator") is not None:
            generator = make_generator(0, self.device)
            try:
                generator.set_state(state["generator"])
            except (TypeError, RuntimeError, ValueError):
                raise ValueError("sampler state 'generator' is not a torch.Generator state for "
                                 f"device {str(self.device)!r}; the checkpoint is damaged or "
                                 "from another device") from None
        self._kept = {**self._kept, self.key: None if states is None
                      else states.to(self.device, self.dtype), **numbers}
        if generator is not None:
            self._generator = generator


class Advance(Protocol[S, P]):
    """A kernel run: k steps of every chain from `state` with parameters `params`."""

    def __call__(self, generator: torch.Generator, state: S, params: P, num_steps: int
                 ) -> tuple[S, Any]: ...


class Adaptation(Protocol[P]):
    """What `burn_in` drives (blackjax style): `init(params) -> a`, `update(a, info) -> a`
    after each kernel step, `final(a) -> (params, info)`; `params(a)`: the next step's."""

    def init(self, params: P) -> Any: ...
    def update(self, state: Any, info: Any) -> Any: ...
    def final(self, state: Any) -> tuple[P, dict[str, Any]]: ...
    def params(self, state: Any) -> P: ...


def burn_in(advance: Advance[S, P], generator: torch.Generator, state: S, params: P,
            num_steps: int, adaptation: Adaptation[P] | None = None
            ) -> tuple[S, P, dict[str, Any]]:
    """Burn fresh chains in: `num_steps` steps in one kernel run, or one at a time when an
    `adaptation` tunes `params` from each step's info. Returns (state, the parameters to
    sample with, the adaptation's info)."""
    if adaptation is None:
        if num_steps:
            state, _ = advance(generator, state, params, num_steps)
        return state, params, {}
    tuning = adaptation.init(params)
    for _ in range(num_steps):
        state, info = advance(generator, state, adaptation.params(tuning), 1)
        tuning = adaptation.update(tuning, info)
    params, info = adaptation.final(tuning)
    return state, params, info


def run_rounds(advance: Advance[S, P], generator: torch.Generator, state: S, params: P,
               rounds: int, num_steps: int) -> tuple[S, list[tuple[S, Any]]]:
    """`rounds` kernel runs of `num_steps` steps; returns the last state and each round's
    (state, info), the round's samples."""
    out = []
    for _ in range(rounds):
        state, info = advance(generator, state, params, num_steps)
        out.append((state, info))
    return state, out


class ChainSampler(Sampler):
    """Base of the persistent-chain backends: the shell's chains, checkpoints and work model.

    A subclass declares its `Options` (a `ChainOptions`), `round_option` (the option giving the
    kernel steps per round), `replica_option` (the option giving the replicas per chain, if it
    has replica exchange) and `step_word`, `STEP_COST` and `STEP_OVERHEAD` (its work model),
    `chain_key` (what its chain state is called in checkpoints), `state_bytes`, and `_sample`
    (which uses `self.chains`, `self.plan`, `burn_in` and `run_rounds`).
    """

    Options: ClassVar[type[BackendOptions]] = ChainOptions
    round_option: ClassVar[str] = "num_steps"
    #: The option giving each chain's replicas (replica exchange multiplies the states, the
    #: work and the memory by it); None: one state per chain.
    replica_option: ClassVar[str | None] = None
    step_word: ClassVar[str] = "steps"
    chain_key: ClassVar[str] = "position"
    #: Options whose value the chains carry and may change (MALA's adapted step size): kept
    #: with the chains in checkpoints, back at the option's value when chains restart.
    chain_numbers: ClassVar[tuple[str, ...]] = ()
    #: Work model: a step costs each chain STEP_COST × (units + couplings) update-equivalents,
    #: plus a fixed dispatch cost of STEP_OVERHEAD however small the problem.
    STEP_COST: ClassVar[float] = 1.0
    STEP_OVERHEAD: ClassVar[float] = 0.0

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        device_here(self.name, self.options.device)
        self.chains = Chains(self.options, key=self.chain_key, defaults={
            name: getattr(self.options, name) for name in self.chain_numbers})

    @classmethod
    @abc.abstractmethod
    def state_bytes(cls, plan: Plan, num_samples: int, n_units: int, elem: int) -> float:
        """Memory of one call: chain state, kernel buffers and the samples kept."""

    @classmethod
    def plan_of(cls, options: BackendOptions, num_samples: int) -> Plan:
        """The `Plan` of a call under (parsed) `options`: the one split the sampler runs and
        its work model prices."""
        replicas = getattr(options, cls.replica_option) if cls.replica_option else 1
        return Plan.of(options.num_chains, num_samples, replicas)

    @classmethod
    def step_cost(cls, plan: Plan) -> tuple[float, float]:
        """(cost of one step of one chain state per unit of size, fixed cost of a step) under
        `plan`: STEP_COST and STEP_OVERHEAD; a backend whose replicas add work per step (swap
        moves) says how much more here."""
        return cls.STEP_COST, cls.STEP_OVERHEAD

    @classmethod
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        o = cls.parse_options(options)
        plan = cls.plan_of(o, num_samples)
        per_round = getattr(o, cls.round_option)
        elem, chains, size = DTYPES[o.dtype].itemsize, plan.n_chains, shape.size
        cost, overhead = cls.step_cost(plan)
        scale = "" if cost == 1 else f"{cost:g} × "
        tempered = cls.replica_option is not None and plan.replicas > 1
        replicas = f" × {cls.replica_option} {plan.replicas}" if tempered else ""
        scaled_by = (cls.replica_option,) if tempered else ()
        return {
            "work": Cost(plan.steps(o.burn_in, per_round)
                         * (cost * plan.rows * size + overhead),
                         f"(burn_in {o.burn_in} + {plan.rounds} round(s) × {cls.round_option} "
                         f"{per_round}) {cls.step_word} × ({scale}num_chains {chains}{replicas} "
                         f"× size {size} + {overhead:g})",
                         (cls.round_option, "burn_in", "num_chains", *scaled_by, "num_samples")),
            "state_bytes": Cost(cls.state_bytes(plan, num_samples, shape.n_units, elem),
                                f"num_chains {chains}{replicas} × {shape.n_units} units × "
                                f"{elem} bytes", ("num_chains", *scaled_by, "num_samples")),
        }

    def plan(self, num_samples: int, n_units: int) -> Plan:
        """This call's chains and rounds, after refusing chain state over MAX_STATE_BYTES."""
        plan = self.plan_of(self.options, num_samples)
        replicas = f" × {self.replica_option}={plan.replicas}" if plan.replicas > 1 else ""
        check_state_bytes(self.state_bytes(plan, num_samples, n_units, self.chains.dtype.itemsize),
                          f"num_chains={plan.n_chains}{replicas} on {n_units} units")
        return plan

    def chain_info(self, plan: Plan, fresh: bool) -> dict[str, Any]:
        """The facts every chain backend reports."""
        return {"num_chains": plan.n_chains, self.round_option: getattr(
            self.options, self.round_option), "rounds": plan.rounds,
            "burned_in": fresh and self.options.burn_in > 0}

    def reset(self) -> None:
        self.chains.reset()

    def _conditioning_changed(self) -> None:
        self.chains.reset()

    def state_dict(self) -> dict[str, Any]:
        return self.chains.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chains.load_state_dict(state)
