"""The sampler contract: `Sampler.sample(rbm, num_samples, seed=...) -> SampleSet`.

Every backend subclasses `Sampler` and implements `_sample`; the base class validates the input
once (so no backend spends time on a garbage problem), times the call, and fills the same
`info["timing"]` keys everywhere: `preprocess_s`, `sample_s`, `postprocess_s`, `total_s`.
"""

from __future__ import annotations

import abc
import inspect
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import dimod
import torch

from backends.options import BackendOptions, Capabilities, parse_options
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import to_rbm
from qvae.conditioning import Conditioned, check_clamp, condition
from qvae.rbm import RBM

TIMING_KEYS = ("preprocess_s", "sample_s", "postprocess_s", "total_s")

#: Memory a backend allocates for its chain state in one call, beyond which it refuses the
#: options whatever the caller (a value this big is a mistake or an attack, not a request).
MAX_STATE_BYTES = 16 * 2**30


class SampleSet:
    """Samples of a prior's units, their energies under that prior, and backend facts.

    `states` (N, n_units) holds z: [v, h] for an `RBM`, the `variables` order for a
    `BoltzmannMachine`; `energy` (N,) holds E(z). For an RBM `visible` (N, n_visible) and
    `hidden` (N, n_hidden) are its layers; a BoltzmannMachine's samples have no layers (use
    `states`). {0,1} float tensors. Continuous backends also set `continuous` (the unrounded
    state, laid out like `states` for a BM and like [v, h] for an RBM).

    >>> s = SampleSet.of_states(torch.tensor([[1., 0., 1.]]), torch.tensor([-1.]))
    >>> s.states.shape, len(s)
    (torch.Size([1, 3]), 1)
    """

    def __init__(self, visible: torch.Tensor, hidden: torch.Tensor, energy: torch.Tensor,
                 info: dict[str, Any] | None = None,
                 continuous: torch.Tensor | None = None) -> None:
        self._visible, self._hidden, self._states = visible, hidden, None
        self.energy, self.continuous = energy, continuous
        self.info: dict[str, Any] = {} if info is None else info

    @classmethod
    def of_states(cls, states: torch.Tensor, energy: torch.Tensor,
                  info: dict[str, Any] | None = None,
                  continuous: torch.Tensor | None = None) -> SampleSet:
        """Samples of a model without layers (a `BoltzmannMachine`)."""
        out = cls(states[:, :0], states[:, :0], energy, info, continuous)
        out._visible = out._hidden = None
        out._states = states
        return out

    @property
    def layered(self) -> bool:
        """True for an RBM's samples (`visible` and `hidden` exist)."""
        return self._states is None

    @property
    def visible(self) -> torch.Tensor:
        if self._visible is None:
            raise AttributeError("a BoltzmannMachine's samples have no visible layer; use "
                                 ".states (z in the model's `variables` order)")
        return self._visible

    @property
    def hidden(self) -> torch.Tensor:
        if self._hidden is None:
            raise AttributeError("a BoltzmannMachine's samples have no hidden layer; use "
                                 ".states (z in the model's `variables` order)")
        return self._hidden

    @property
    def states(self) -> torch.Tensor:
        """z, shape (N, n_units): [v, h] for an RBM, `variables` order for a BM."""
        if self._states is not None:
            return self._states
        return torch.cat([self._visible, self._hidden], dim=1)

    def __len__(self) -> int:
        return self.energy.shape[0]

    def __repr__(self) -> str:
        return (f"SampleSet({len(self)} samples of {self.states.shape[1]} units, "
                f"backend={self.info.get('backend')!r})")


@dataclass(frozen=True)
class ProblemShape:
    """What a work model needs to know of a problem before it is built.

    `bipartite` is False for a general BQM with an odd cycle: it has no layers, so `n_visible`
    counts all its variables and `n_hidden` is 0; `largest_class` is then the size of its
    largest colour class (the units exact enumeration sums out analytically), 0 when unknown.
    `ProblemShape.of(model)` builds it for an RBM or a BoltzmannMachine.
    """

    n_visible: int
    n_hidden: int
    n_couplings: int
    bipartite: bool = True
    largest_class: int = 0

    @classmethod
    def of(cls, model: RBM | BoltzmannMachine) -> ProblemShape:
        """The shape of an RBM, or of a BoltzmannMachine (two colour classes: its classes as
        the layers; more: not bipartite, with its largest class)."""
        if isinstance(model, RBM):
            couplings = (model.n_visible * model.n_hidden if model.mask is None
                         else int((model.mask != 0).sum()))
            return cls(model.n_visible, model.n_hidden, couplings)
        sizes = [int(c.numel()) for c in model.colour_classes]
        if len(sizes) == 2:
            return cls(sizes[0], sizes[1], model.n_edges)
        return cls(model.n_units, 0, model.n_edges, False, max(sizes))

    @property
    def n_units(self) -> int:
        return self.n_visible + self.n_hidden

    @property
    def size(self) -> int:
        """Units + couplings: what one sweep of one chain touches."""
        return self.n_visible + self.n_hidden + self.n_couplings


@dataclass(frozen=True)
class Cost:
    """One quantity of a work model: its value, how it was computed, and the options that
    scale it (named in a refusal so the caller knows what to lower)."""

    value: float
    formula: str
    options: tuple[str, ...]


#: The quantities a work model may report (a service holds each to a limit):
#: work: update-equivalents of CPU work (≈ 10^10 per second on one core with the torch kernels),
#: state_bytes: memory of the chain state and buffers, enumerated_states: states enumerated,
#: seconds: declared waits (timeouts, back-off), qpu_seconds: estimated QPU access time.
WORK_QUANTITIES = ("work", "state_bytes", "enumerated_states", "seconds", "qpu_seconds")


def check_state_bytes(nbytes: float, options: str) -> None:
    """ValueError naming `options` when one call would allocate more than MAX_STATE_BYTES."""
    if nbytes > MAX_STATE_BYTES:
        raise ValueError(f"{options} would allocate ~{nbytes / 2**30:.3g} GiB of chain state "
                         f"in one call, over the {MAX_STATE_BYTES / 2**30:g} GiB this backend "
                         "allows; use fewer chains or samples per call")


class Timer:
    """Accumulates wall time per phase; `timer("sample")` is a context manager."""

    def __init__(self) -> None:
        self.seconds = {key: 0.0 for key in TIMING_KEYS}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        key = f"{phase}_s"
        if key not in self.seconds:
            raise ValueError(f"unknown timing phase {phase!r}; use one of {TIMING_KEYS}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start


def check_num_samples(num_samples: Any) -> int:
    if num_samples is None:
        raise TypeError("num_samples is required (an int > 0)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    return num_samples


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return seed


def check_rbm(rbm: Any) -> RBM:
    if not isinstance(rbm, RBM):
        raise TypeError(f"expected a qvae.RBM, got {type(rbm).__name__}")
    rbm.validate()
    return rbm


def check_model(model: Any) -> RBM | BoltzmannMachine:
    """An RBM or a BoltzmannMachine with finite parameters (TypeError/ValueError otherwise)."""
    if not isinstance(model, (RBM, BoltzmannMachine)):
        raise TypeError(f"expected a qvae.RBM or a qvae.BoltzmannMachine, got "
                        f"{type(model).__name__}")
    model.validate()
    return model


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed`, or from fresh entropy when seed is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class Sampler(abc.ABC):
    """Base class of every backend.

    A backend is one file: a subclass that sets `name`, declares its options as a pydantic
    `Options` model (see `backends.options`) and its `capabilities`, optionally its `work`
    model, and implements `_sample`. `__init__` takes the options as keywords, checks them once
    against `Options` and keeps the result in `self.options`; a subclass that needs setup
    calls `super().__init__(**options)` first.

    >>> from backends.options import Field
    >>> class CoinOptions(BackendOptions):
    ...     p: float = Field(0.5, ge=0, le=1, description="probability of a 1")
    >>> class Coin(Sampler):
    ...     name, Options = "coin", CoinOptions
    ...     def _sample(self, rbm, num_samples, *, seed, timer): ...
    >>> Coin(p=0.25).options.p
    0.25
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Derived from `capabilities` (kept for callers that read `cls.binary`).
    binary: ClassVar[bool] = True
    #: Options under which the conformance suite checks this backend (e.g. the emulator).
    conformance_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.binary = cls.capabilities.binary
        if "__init__" not in cls.__dict__ or cls.__init__ is Sampler.__init__:
            # help(cls) and inspect.signature(cls) show the declared options.
            cls.__signature__ = inspect.Signature([
                inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                  default=(f.get_default(call_default_factory=True)
                                           if not f.is_required()
                                           else inspect.Parameter.empty))
                for n, f in cls.Options.model_fields.items()])

    def __init__(self, **options: Any) -> None:
        self.options = self.parse_options(options)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | BackendOptions) -> BackendOptions:
        """`options` checked against `cls.Options` (an `OptionError` naming the bad one)."""
        return parse_options(cls.Options, options, backend=cls.name or cls.__name__)

    @classmethod
    def option_names(cls) -> list[str]:
        return list(cls.Options.model_fields)

    @classmethod
    def work(cls, options: Mapping[str, Any] | BackendOptions, shape: ProblemShape,
             num_samples: int) -> dict[str, Cost]:
        """The cost of one `sample(problem, num_samples)` call of a sampler built with
        `options` (parsed by `parse_options`; defaults fill the rest), by quantity of
        `WORK_QUANTITIES`. A service checks it against its limits before queueing anything.
        Each backend declares its model here, beside its options; {} means no model (the
        backend's cost does not scale with its options, e.g. a client of another service)."""
        cls.parse_options(options)
        return {}

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here?, why not). Backends that need hardware or credentials override it."""
        return True, ""

    def sample(self, model: RBM | BoltzmannMachine, num_samples: int | None = None, *,
               seed: int | None = None, clamp: Mapping[int, int] | None = None) -> SampleSet:
        """Draw `num_samples` states of `model`, an `RBM` or a `BoltzmannMachine`
        (`num_samples` is required; its default only lets a dimod BQM, passed dimod-style as
        `sample(bqm)`, get a pointer to `backends.as_dimod`). The same seed gives the same
        samples from a fresh sampler built with the same options.

        `clamp` maps unit index (in z = [v, h] for an RBM, in `variables` order for a
        BoltzmannMachine) to 0 or 1: the samples are then exact samples of the conditional
        given those units, which hold their values in every sample (see `qvae.conditioning`).
        """
        if isinstance(model, dimod.BinaryQuadraticModel):  # the Ocean way in is a dimod.Sampler
            raise TypeError(
                f"{type(self).__name__}.sample takes a qvae.RBM or BoltzmannMachine; for a "
                f"dimod BQM use backends.as_dimod({self.name!r}, **options).sample(bqm, "
                "num_reads=N, seed=S), a dimod.Sampler that returns a dimod.SampleSet")
        check_model(model)
        check_num_samples(num_samples)
        check_seed(seed)
        clamp = check_clamp(clamp, model.n_units)
        conditioning = None if clamp is None else tuple(sorted(clamp.items()))
        if conditioning != self.__dict__.get("_conditioning", None):
            # a new conditional (or back to the joint): chains kept from the last one would
            # start from the wrong distribution, so persistent backends start afresh
            self._conditioning_changed()
        self._conditioning = conditioning
        timer = Timer()
        with timer("total"), torch.no_grad():
            if clamp:
                out = self._sample_clamped(model, num_samples, clamp, seed=seed, timer=timer)
            else:
                out = self._sample_model(model, num_samples, seed=seed, timer=timer)
        out.info["timing"] = dict(timer.seconds)
        out.info.setdefault("backend", self.name)
        return out

    def _sample_model(self, model: RBM | BoltzmannMachine, num_samples: int, *,
                      seed: int | None, timer: Timer) -> SampleSet:
        if isinstance(model, RBM):
            return self._sample(model, num_samples, seed=seed, timer=timer)
        return self._sample_bm(model, num_samples, seed=seed, timer=timer)

    def _sample_bm(self, bm: BoltzmannMachine, num_samples: int, *, seed: int | None,
                   timer: Timer) -> SampleSet:
        """A BoltzmannMachine's samples. By default: a model without couplings exactly, a
        two-colour (bipartite) one as an RBM through `_sample`, any other through
        `sample_general_bqm` when the backend has it. Backends with a kernel for any graph
        (gibbs, dwave) override this."""
        if bm.n_edges == 0:
            p = torch.sigmoid(bm.bias.detach().double()).expand(num_samples, -1)
            states = torch.bernoulli(p, generator=make_generator(seed)).to(bm.bias.dtype)
            return SampleSet.of_states(states, bm.sample_energy(states), {"independent": True})
        form = to_rbm(bm)
        if form is not None:
            rbm, order = form
            out = self._sample(rbm, num_samples, seed=seed, timer=timer)
            states = torch.empty_like(out.states)
            states[:, order.to(states.device)] = out.states
            continuous = None  # kept when it covers every unit (langevin's covers v only)
            if out.continuous is not None and out.continuous.shape == out.states.shape:
                continuous = torch.empty_like(out.continuous)
                continuous[:, order.to(continuous.device)] = out.continuous
            return SampleSet.of_states(states, bm.sample_energy(states), out.info, continuous)
        if self.capabilities.general_bqm:
            general = self.sample_general_bqm(bm.to_bqm(), num_samples, seed=seed)
            labels = {v: k for k, v in enumerate(general.variables)}
            column = [labels[v] for v in bm.variables]
            states = torch.as_tensor(general.samples[:, column]).to(bm.bias.dtype)
            states = states.to(bm.bias.device)
            info = {k: v for k, v in general.info.items() if k != "timing"}
            return SampleSet.of_states(states, bm.sample_energy(states), info)
        raise NotImplementedError(
            f"backend {self.name!r} does not sample a Boltzmann machine with "
            f"{len(bm.colour_classes)} colour classes (it samples RBMs and bipartite models); "
            "use 'gibbs', 'neal', 'exact' or 'dwave' for this model")

    def _sample_clamped(self, model: RBM | BoltzmannMachine, num_samples: int,
                        clamp: dict[int, int], *, seed: int | None,
                        timer: Timer) -> SampleSet:
        """Exact conditional samples: the free units' model (clamped units folded into their
        neighbours' biases) sampled as an ordinary model, the clamped values written back."""
        with timer("preprocess"):
            cond: Conditioned = condition(model, clamp)
        if cond.model is None:  # no coupling left among the free units: independent
            free = cond.sample_independent(num_samples, make_generator(seed))
            info: dict[str, Any] = {"independent": True}
            continuous = None
        else:
            inner = self._sample_model(cond.model, num_samples, seed=seed, timer=timer)
            free, info, continuous = inner.states, inner.info, inner.continuous
        with timer("postprocess"):
            states = cond.assemble(free)
            if continuous is not None and continuous.shape == free.shape:
                continuous = cond.assemble(continuous)
            else:
                continuous = None
            info["clamped"] = len(clamp)
            if isinstance(model, RBM):
                nv = model.n_visible
                v, h = states[:, :nv], states[:, nv:]
                return SampleSet(v, h, energies(model, v, h), info, continuous)
            return SampleSet.of_states(states, model.sample_energy(states), info, continuous)

    def _conditioning_changed(self) -> None:  # noqa: B027 - optional hook
        """Called when a call's `clamp` differs from the previous call's; backends with
        persistent chains drop them here (a fresh burn-in follows)."""

    def sample_general_bqm(self, bqm: dimod.BinaryQuadraticModel, num_samples: int, *,
                           seed: int | None = None) -> dimod.SampleSet:
        """Samples of any BQM, for backends whose `capabilities.general_bqm` is True."""
        raise NotImplementedError(f"backend {self.name!r} samples RBMs only (capabilities."
                                  "general_bqm is False); use 'exact', 'neal' or 'dimod' for "
                                  "a general BQM")

    @abc.abstractmethod
    def _sample(
        self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer
    ) -> SampleSet: ...

    def connectivity_mask(self, n_visible: int, n_hidden: int) -> torch.Tensor | None:
        """The couplings this backend can realise, as an (n_visible, n_hidden) 0/1 mask, or None
        when any dense RBM works. A trainer builds its RBM with this mask (e.g. native QPU)."""
        return None

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless backends keep the default
        """Forget any persistent state (chains, adapted step sizes, caches)."""

    def state_dict(self) -> dict[str, Any]:
        """Persistent state to store in a checkpoint (empty for stateless backends)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@torch.no_grad()
def energies(rbm: RBM, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """E(v, h) under `rbm`, detached, on the samples' device and dtype (`RBM.sample_energy`)."""
    return rbm.sample_energy(visible, hidden)
