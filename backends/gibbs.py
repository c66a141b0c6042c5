"""`gibbs`: vectorised block Gibbs in torch with persistent chains (PCD).

A sweep is v ~ p(v | h) then h ~ p(h | v) for every chain at once; the chain state is h. Chains
persist across calls for the same RBM shape (and are re-initialised and burned in when the shape,
chain count, device or dtype changes), so a trainer pays burn-in once and `num_sweeps` per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from backends.base import SampleSet, Timer, energies
from backends.chains import ChainOptions, ChainSampler, Plan, burn_in, run_rounds
from backends.numerics import check_precision
from backends.options import Capabilities, Field
from qvae import cancel
from qvae.rbm import RBM

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


def gibbs_advance(
    generator: torch.Generator, h: torch.Tensor, params: Sequence[torch.Tensor], num_sweeps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gibbs_sweeps` in the chain shell's shape: (state h, info v) after `num_sweeps` sweeps,
    `params` = (β W, β b, β c)."""
    v, h = gibbs_sweeps(h, *params, num_sweeps, generator)
    return h, v


class GibbsOptions(ChainOptions):
    num_sweeps: int = Field(10, ge=1, description="sweeps per call, and between successive "
                            "rounds when num_samples > num_chains")
    burn_in: int = Field(100, ge=0, description="sweeps run once when chains start: on the "
                         "first call, a new hidden-layer size or chain count, every call when "
                         "persistent is false")
    beta: float = Field(1.0, gt=0, description="inverse temperature: samples follow "
                        "exp(-beta * E)")


class GibbsSampler(ChainSampler):
    """Block Gibbs with persistent chains (options: `GibbsOptions`).

    The chain state is h (kept as "hidden" in checkpoints); `num_sweeps` sweeps per round.
    """

    name = "gibbs"
    Options = GibbsOptions
    capabilities = Capabilities(resource="cpu", output="binary")
    round_option, step_word, chain_key = "num_sweeps", "sweeps", "hidden"
    #: Work model: every sweep costs each chain its units + couplings, plus a fixed dispatch
    #: cost of ~20 µs (≈ 2·10^5 update-equivalents) however small the problem.
    STEP_COST, STEP_OVERHEAD = 1.0, 2e5

    @classmethod
    def state_bytes(cls, plan: Plan, num_samples: int, n_units: int, elem: int) -> float:
        """Chain state and matmul buffers (4 per chain) plus the samples kept (2 per sample)."""
        chains = plan.n_chains
        return float(elem * n_units * (4 * chains + 2 * plan.rounds * chains)
                     + BLOCK_BYTES * 5 / 4)

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        o, chains = self.options, self.chains
        with timer("preprocess"):
            check_precision(rbm, chains.dtype, backend=self.name, beta=o.beta)
            gen = chains.generator(seed)
            params = [p.detach().to(chains.device, chains.dtype) * o.beta for p in
                      (rbm.effective_weight(), rbm.visible_bias, rbm.hidden_bias)]
            plan = self.plan(num_samples, rbm.n_units)
            kept = chains.resume((plan.n_chains, rbm.n_hidden))
        with timer("sample"):
            if kept is None:  # fresh chains from Bernoulli(½), burned in
                h0 = torch.empty(plan.n_chains, rbm.n_hidden, device=chains.device,
                                 dtype=chains.dtype)
                h = torch.bernoulli(h0.fill_(0.5), generator=gen)
                h, _, _ = burn_in(gibbs_advance, gen, h, params, o.burn_in)
            else:
                h = kept["hidden"]
            h, samples = run_rounds(gibbs_advance, gen, h, params, plan.rounds, o.num_sweeps)
            chains.keep(h)
        with timer("postprocess"):
            out_device, out_dtype = rbm.weight.device, rbm.weight.dtype
            visible = torch.cat([v for _, v in samples])[:num_samples].to(out_device, out_dtype)
            hidden = torch.cat([h for h, _ in samples])[:num_samples].to(out_device, out_dtype)
            energy = energies(rbm, visible, hidden)
        fresh = kept is None
        info = {
            **self.chain_info(plan, fresh),
            "beta": o.beta,
            "spin_updates": plan.steps(o.burn_in, o.num_sweeps, fresh)
            * plan.n_chains * rbm.n_units,
        }
        return SampleSet(visible, hidden, energy, info)
