"""`gibbs`: vectorised block Gibbs in torch with persistent chains (PCD).

A sweep is v ~ p(v | h) then h ~ p(h | v) for every chain at once; the chain state is h. Chains
persist across calls for the same RBM shape (and are re-initialised and burned in when the shape,
chain count, device or dtype changes), so a trainer pays burn-in once and `num_sweeps` per call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from backends.base import (
    Cost,
    ProblemShape,
    Sampler,
    SampleSet,
    Timer,
    check_state_bytes,
    energies,
    make_generator,
    option_values,
)
from backends.numerics import check_precision
from qvae import cancel
from qvae.rbm import RBM

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Uniforms for up to this many bytes are drawn in one go (several sweeps' worth when they fit).
BLOCK_BYTES = 4 << 20

_FULL_RANGE = -(2**63)  # random_(_FULL_RANGE, None) on int64: all 64 bits uniform


def uniform_buffer(
    count: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, uniforms): scratch for `draw_uniforms` and a view of it holding `count` floats.

    float32: int32 storage of 5m words (m = count/4, rounded up to even): 3m random words, m
    uniforms assembled from their spare bits, m scratch. float64: int64 storage, one word per
    uniform. Other float types: the uniforms themselves.
    """
    if dtype == torch.float32:
        m = -(-count // 4)
        m += m % 2
        storage = torch.empty(5 * m, dtype=torch.int32, device=device)
        return storage, storage[: 4 * m].view(torch.float32)[:count]
    if dtype == torch.float64:
        storage = torch.empty(count, dtype=torch.int64, device=device)
        return storage, storage.view(torch.float64)
    storage = torch.empty(count, dtype=dtype, device=device)
    return storage, storage


def draw_uniforms(storage: torch.Tensor, generator: torch.Generator) -> None:
    """Fill the uniforms of `storage` (from `uniform_buffer`) with fresh U(0, 1) draws.

    Raw words from `generator` (random_ on int64: about 1.7x cheaper per bit than `uniform_` on
    CPU) go into the mantissa of 1.0, giving floats in [1, 2) on a 2^-m grid (m = 23 or 52);
    subtracting 1 - 2^-(m+1), exactly, leaves u = (k + 1/2) 2^-m. So P(u < p) is p rounded to
    the nearest multiple of 2^-m: off by at most 2^-(m+1), the same bound as comparing with
    `torch.rand`'s 24-bit float32 uniforms.

    float32 also uses the spare high bits of the 32-bit words: for words a, b, c, bits 9..31 of
    a ^ (b >> 9) ^ (c >> 18) are, bit by bit, a[23..31], b[23..31] and c[27..31] (bits no other
    uniform uses) xor-ed with bits below them in that list (a triangular, invertible map) and
    with used low bits, so they are 23 uniform bits independent of every other uniform: four
    uniforms per three words, 25% fewer draws.
    """
    if storage.dtype == torch.int32:
        m = storage.numel() // 5
        words, extra, scratch = storage[: 3 * m], storage[3 * m : 4 * m], storage[4 * m :]
        words.view(torch.int64).random_(_FULL_RANGE, None, generator=generator)
        a, b, c = words.view(3, m)
        torch.bitwise_xor(a, torch.bitwise_right_shift(b, 9, out=scratch), out=extra)
        extra.bitwise_xor_(torch.bitwise_right_shift(c, 18, out=scratch)).bitwise_right_shift_(9)
        bits, mantissa, one, half_step = storage[: 4 * m], (1 << 23) - 1, 0x3F800000, 2.0**-24
        floats = bits.view(torch.float32)
    elif storage.dtype == torch.int64:
        storage.random_(_FULL_RANGE, None, generator=generator)
        bits, mantissa, one, half_step = storage, (1 << 52) - 1, 0x3FF0000000000000, 2.0**-53
        floats = bits.view(torch.float64)
    else:
        storage.uniform_(generator=generator)
        return
    bits.bitwise_and_(mantissa).bitwise_or_(one)
    floats.sub_(1.0 - half_step)


def gibbs_sweeps(
    h: torch.Tensor,
    weight: torch.Tensor,
    visible_bias: torch.Tensor,
    hidden_bias: torch.Tensor,
    num_sweeps: int,
    generator: torch.Generator,
    *,
    block_bytes: int = BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `num_sweeps` block-Gibbs sweeps from hidden state `h`; return the last (v, h).

    The kernel: a plain function of tensors (β already folded into the parameters), on any
    device. A sweep sets v = [u < σ(b + h Wᵀ)] then h = [u' < σ(c + v W)] with fresh uniforms,
    i.e. exactly Bernoulli(σ(·)) draws. For speed every buffer is allocated once per call and
    written with `out=` / in place, the matmuls run on the {0,1} float state, and the uniforms
    for several sweeps (up to `block_bytes`) are drawn at once by `draw_uniforms`. `h` is left
    untouched; the returned (v, h) are new tensors.
    """
    if isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int) or num_sweeps < 1:
        raise ValueError(f"num_sweeps must be an int >= 1, got {num_sweeps!r}")
    n, nh = h.shape
    nv = weight.shape[0]
    per_sweep = n * (nv + nh)
    block = max(1, min(num_sweeps, block_bytes // max(1, per_sweep * h.element_size())))
    storage, uniforms = uniform_buffer(block * per_sweep, h.dtype, h.device)
    uniforms = uniforms.view(block, per_sweep)
    u_v = uniforms[:, : n * nv].unflatten(1, (n, nv))  # each [i] contiguous
    u_h = uniforms[:, n * nv :].unflatten(1, (n, nh))
    v, h_out = h.new_empty(n, nv), h.new_empty(n, nh)
    pre_v, pre_h = h.new_empty(n, nv), h.new_empty(n, nh)
    weight_t = weight.T  # a view: BLAS takes the transpose as is
    for start in range(0, num_sweeps, block):
        draw_uniforms(storage, generator)
        for i in range(min(block, num_sweeps - start)):
            torch.addmm(visible_bias, h, weight_t, out=pre_v)
            torch.lt(u_v[i], pre_v.sigmoid_(), out=v)
            torch.addmm(hidden_bias, v, weight, out=pre_h)
            torch.lt(u_h[i], pre_h.sigmoid_(), out=h_out)
            h = h_out
            cancel.check()  # a service's wall-time limit or shutdown stops the run here
    return v, h_out


class GibbsSampler(Sampler):
    """Block Gibbs with persistent chains.

    Args:
        num_sweeps: sweeps per call (and between successive rounds when num_samples > chains).
        burn_in: sweeps run once when chains are (re)initialised.
        num_chains: parallel chains; None means one chain per requested sample.
        persistent: keep chains across calls (PCD); False starts fresh chains every call.
        beta: inverse temperature; samples follow exp(-beta * E).
        device, dtype: where and in what precision the chains run.
    """

    name = "gibbs"
    binary = True

    def __init__(
        self,
        *,
        num_sweeps: int = 10,
        burn_in: int = 100,
        num_chains: int | None = None,
        persistent: bool = True,
        beta: float = 1.0,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        for key, val, low in (("num_sweeps", num_sweeps, 1), ("burn_in", burn_in, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{key} must be an int >= {low}, got {val!r}")
        if num_chains is not None and (
            isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1
        ):
            raise ValueError(f"num_chains must be None or an int >= 1, got {num_chains!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use 'cpu'")
        self.num_sweeps, self.burn_in, self.num_chains = num_sweeps, burn_in, num_chains
        self.persistent, self.beta, self.dtype = bool(persistent), float(beta), DTYPES[dtype]
        self._hidden: torch.Tensor | None = None  # persistent chain state
        self._generator: torch.Generator | None = None

    #: Work model: every sweep costs each chain its units + couplings, plus a fixed dispatch
    #: cost of ~20 µs (≈ 2·10^5 update-equivalents) however small the problem.
    SWEEP_OVERHEAD = 2e5

    @classmethod
    def work(cls, options: Mapping[str, Any], shape: ProblemShape, num_samples: int
             ) -> dict[str, Cost]:
        o = option_values(cls, options)
        chains = o["num_chains"] or num_samples
        rounds = math.ceil(num_samples / chains)
        sweeps = o["burn_in"] + rounds * o["num_sweeps"]
        elem = DTYPES[o["dtype"]].itemsize
        return {
            "work": Cost(sweeps * (chains * shape.size + cls.SWEEP_OVERHEAD),
                         f"(burn_in {o['burn_in']} + {rounds} round(s) × num_sweeps "
                         f"{o['num_sweeps']}) sweeps × (num_chains {chains} × size "
                         f"{shape.size} + {cls.SWEEP_OVERHEAD:g})",
                         ("num_sweeps", "burn_in", "num_chains", "num_samples")),
            "state_bytes": Cost(cls._state_bytes(chains, rounds, shape.n_units, elem),
                                f"num_chains {chains} × {shape.n_units} units × {elem} bytes",
                                ("num_chains", "num_samples")),
        }

    @staticmethod
    def _state_bytes(chains: int, rounds: int, n_units: int, elem: int) -> float:
        """Chain state and matmul buffers (4 per chain) plus the samples kept (2 per sample)."""
        return float(elem * n_units * (4 * chains + 2 * rounds * chains) + BLOCK_BYTES * 5 / 4)

    def reset(self) -> None:
        self._hidden = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "hidden": None if self._hidden is None else self._hidden.cpu(),
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hidden = state.get("hidden")
        self._hidden = None if hidden is None else hidden.to(self.device, self.dtype)
        if state.get("generator") is not None:
            self._generator = make_generator(0, self.device)
            self._generator.set_state(state["generator"])

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        with timer("preprocess"):
            check_precision(rbm, self.dtype, backend=self.name, beta=self.beta)
            if seed is not None or self._generator is None:
                self._generator = make_generator(seed, self.device)
            gen = self._generator
            params = [p.detach().to(self.device, self.dtype) * self.beta for p in
                      (rbm.effective_weight(), rbm.visible_bias, rbm.hidden_bias)]
            n_chains = self.num_chains or num_samples
            check_state_bytes(self._state_bytes(n_chains, math.ceil(num_samples / n_chains),
                                                rbm.n_units, self.dtype.itemsize),
                              f"num_chains={n_chains} on {rbm.n_units} units")
            fresh = (
                not self.persistent
                or self._hidden is None
                or tuple(self._hidden.shape) != (n_chains, rbm.n_hidden)
            )
        with timer("sample"):
            if fresh:
                h0 = torch.empty(n_chains, rbm.n_hidden, device=self.device, dtype=self.dtype)
                h = torch.bernoulli(h0.fill_(0.5), generator=gen)
                if self.burn_in:
                    _, h = gibbs_sweeps(h, *params, self.burn_in, gen)
            else:
                h = self._hidden
            rounds = math.ceil(num_samples / n_chains)
            vs, hs = [], []
            for _ in range(rounds):
                v, h = gibbs_sweeps(h, *params, self.num_sweeps, gen)
                vs.append(v)
                hs.append(h)
            if self.persistent:
                self._hidden = h
        with timer("postprocess"):
            out_device, out_dtype = rbm.weight.device, rbm.weight.dtype
            visible = torch.cat(vs)[:num_samples].to(out_device, out_dtype)
            hidden = torch.cat(hs)[:num_samples].to(out_device, out_dtype)
            energy = energies(rbm, visible, hidden)
        info = {
            "num_chains": n_chains,
            "num_sweeps": self.num_sweeps,
            "rounds": rounds,
            "burned_in": fresh and self.burn_in > 0,
            "beta": self.beta,
            "spin_updates": (rounds * self.num_sweeps + (self.burn_in if fresh else 0))
            * n_chains * rbm.n_units,
        }
        return SampleSet(visible, hidden, energy, info)
