"""`gibbs`: vectorised block Gibbs in torch with persistent chains (PCD).

RBM: a sweep is v ~ p(v | h) then h ~ p(h | v) for every chain at once; the chain state is h.
`BoltzmannMachine` (any graph): a sweep redraws each colour class in turn from its exact
conditional (the units of a class are independent given the rest), every chain at once; the
chain state is the full z. Chains persist across calls for the same model kind and shape (and
are re-initialised and burned in when the kind, shape, chain count, replica count, device or
dtype changes), so a trainer pays burn-in once and `num_sweeps` per call.

With `num_replicas` K > 1 both kernels run replica exchange (parallel tempering,
`backends.tempering`): each chain is K states on a β ladder, adjacent ones proposing to swap
after every sweep, and the samples are the target replica's. The chain state is then K times as
many rows (replica-major: the target's chains first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from backends.base import SampleSet, Timer, energies
from backends.chains import ChainOptions, ChainSampler, Plan, burn_in, run_rounds
from backends.numerics import check_precision, precision_limit
from backends.options import Capabilities, Field
from backends.tempering import ReplicaExchange, ladder
from qvae import cancel
from qvae.boltzmann import DENSE_MIN_DENSITY, LAYOUTS, BoltzmannMachine
from qvae.rbm import RBM

#: Uniforms for up to this many bytes are drawn in one go (several sweeps' worth when they fit).
BLOCK_BYTES = 4 << 20

#: Most replicas per chain (replica exchange multiplies a call's work and memory by their number).
MAX_REPLICAS = 64

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
    exchange: ReplicaExchange | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `num_sweeps` block-Gibbs sweeps from hidden state `h`; return the last (v, h).

    The kernel: a plain function of tensors (β already folded into the parameters), on any
    device. A sweep sets v = [u < σ(b + h Wᵀ)] then h = [u' < σ(c + v W)] with fresh uniforms,
    i.e. exactly Bernoulli(σ(·)) draws. For speed every buffer is allocated once per call and
    written with `out=` / in place, the matmuls run on the {0,1} float state, and the uniforms
    for several sweeps (up to `block_bytes`) are drawn at once by `draw_uniforms`. `h` is left
    untouched; the returned (v, h) are new tensors.

    With `exchange` (replica exchange): the rows of `h` are its K replicas of the chains, the
    parameters are at β = 1 and each row's inputs are scaled by its own β; after every sweep
    the replicas propose swaps (`ReplicaExchange.swap`), with E(v, h) from the sweep's own
    product c + v W and uniforms from the same draws, and the (v, h) rows are permuted.
    Without it, the sweep is exactly the plain one (same operations, same draws).
    """
    if isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int) or num_sweeps < 1:
        raise ValueError(f"num_sweeps must be an int >= 1, got {num_sweeps!r}")
    n, nh = h.shape
    nv = weight.shape[0]
    if exchange is not None and exchange.rows != n:
        raise ValueError(f"the exchange has {exchange.rows} chain states, h has {n} rows")
    per_sweep = n * (nv + nh) + (0 if exchange is None else exchange.uniforms)
    block = max(1, min(num_sweeps, block_bytes // max(1, per_sweep * h.element_size())))
    storage, uniforms = uniform_buffer(block * per_sweep, h.dtype, h.device)
    uniforms = uniforms.view(block, per_sweep)
    u_v = uniforms[:, : n * nv].unflatten(1, (n, nv))  # each [i] contiguous
    u_h = uniforms[:, n * nv : n * (nv + nh)].unflatten(1, (n, nh))
    u_swap = uniforms[:, n * (nv + nh) :]
    v, h_out = h.new_empty(n, nv), h.new_empty(n, nh)
    pre_v, pre_h = h.new_empty(n, nv), h.new_empty(n, nh)
    prob_h = None if exchange is None else h.new_empty(n, nh)
    weight_t = weight.T  # a view: BLAS takes the transpose as is
    for start in range(0, num_sweeps, block):
        draw_uniforms(storage, generator)
        for i in range(min(block, num_sweeps - start)):
            torch.addmm(visible_bias, h, weight_t, out=pre_v)
            if exchange is not None:
                pre_v.mul_(exchange.beta_rows)
            torch.lt(u_v[i], pre_v.sigmoid_(), out=v)
            torch.addmm(hidden_bias, v, weight, out=pre_h)
            if exchange is None:
                torch.lt(u_h[i], pre_h.sigmoid_(), out=h_out)
            else:  # keep c + v W at β = 1 for the energy
                torch.mul(pre_h, exchange.beta_rows, out=prob_h)
                torch.lt(u_h[i], prob_h.sigmoid_(), out=h_out)
                swap_rbm_replicas(exchange, v, h_out, pre_h, visible_bias, u_swap[i])
            h = h_out
            cancel.check()  # a service's wall-time limit or shutdown stops the run here
    return v, h_out


def swap_rbm_replicas(exchange: ReplicaExchange, v: torch.Tensor, h: torch.Tensor,
                      pre_h: torch.Tensor, visible_bias: torch.Tensor, u: torch.Tensor) -> None:
    """One round of swap proposals on the RBM kernel's rows, in place: E(v, h) at β = 1 is
    −b·v − h·(c + v W), with c + v W (`pre_h`) already computed by the sweep."""
    energy = torch.addmv(torch.linalg.vecdot(h, pre_h), v, visible_bias).neg_()
    perm = exchange.swap(energy, u)
    v.copy_(v[perm])
    h.copy_(h[perm])


def gibbs_advance(
    generator: torch.Generator, h: torch.Tensor, params: Sequence[torch.Tensor], num_sweeps: int,
    *, exchange: ReplicaExchange | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gibbs_sweeps` in the chain shell's shape: (state h, info v) after `num_sweeps` sweeps,
    `params` = (β W, β b, β c), or (W, b, c) with an `exchange` (β per replica)."""
    v, h = gibbs_sweeps(h, *params, num_sweeps, generator, exchange=exchange)
    return h, v


@dataclass(frozen=True)
class ColourBlock:
    """One colour class of a model laid out in class order: its units are rows start:stop of
    the (units, chains) state; `rows` = β J[class, :] (columns in class order, dense or sparse
    COO) and `bias` = β b[class] as a (len, 1) column."""

    start: int
    stop: int
    rows: torch.Tensor
    bias: torch.Tensor


def colour_blocks(bm: BoltzmannMachine, beta: float, device: torch.device, dtype: torch.dtype,
                  *, layout: str | None = None) -> tuple[torch.Tensor, list[ColourBlock]]:
    """(order, blocks): the units in colour-class order (z[:, order] is the kernel's layout,
    transposed) and each class's block, built once per call, β folded in. Dense or sparse per
    class by the rule of `BoltzmannMachine.coupling_rows` (or as `layout` says); the dense
    classes' rows are built in one go."""
    classes = bm.colour_classes
    n = bm.n_units
    order = torch.cat(classes)
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=order.device)
    if layout is None:  # coupling_rows's density rule, from the degrees (no matrix built)
        degree = torch.bincount(bm.edges.flatten(), minlength=n)
        dense = [float(degree[c].sum()) / (c.numel() * n) >= DENSE_MIN_DENSITY for c in classes]
    elif layout in LAYOUTS:
        dense = [layout == "dense"] * len(classes)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    dense_rows = None
    if any(dense):
        units = torch.cat([c for c, d in zip(classes, dense, strict=True) if d])
        dense_rows = (bm.coupling_rows(units, layout="dense").detach()[:, order] * beta
                      ).to(device, dtype)
    bias = bm.bias.detach() * beta
    blocks, start, offset = [], 0, 0
    for units, is_dense in zip(classes, dense, strict=True):
        stop = start + units.numel()
        if is_dense:
            rows = dense_rows[offset : offset + units.numel()]
            offset += units.numel()
        else:
            sparse = bm.coupling_rows(units, layout="sparse").detach()
            r, c = sparse.indices()
            rows = torch.sparse_coo_tensor(torch.stack([r, position[c]]),
                                           sparse.values() * beta, sparse.shape,
                                           check_invariants=True).coalesce().to(device, dtype)
        blocks.append(ColourBlock(start, stop, rows,
                                  bias[units].to(device, dtype).unsqueeze(1)))
        start = stop
    return order, blocks


def colour_gibbs_sweeps(
    zt: torch.Tensor,
    blocks: Sequence[ColourBlock],
    num_sweeps: int,
    generator: torch.Generator,
    *,
    block_bytes: int = BLOCK_BYTES,
    exchange: ReplicaExchange | None = None,
) -> torch.Tensor:
    """Run `num_sweeps` colour-class block-Gibbs sweeps from `zt`; return the new state.

    The kernel for a `BoltzmannMachine` on any graph, like `gibbs_sweeps` a plain function of
    tensors on any device (β already folded into `blocks`, from `colour_blocks`). The state is
    transposed, (units, chains), units in class order, so that each class is a contiguous block
    of rows, written in place by the comparison. A sweep sets, class by class,
    z_c = [u < σ(b_c + J[c, :] z)] with fresh uniforms: exact Bernoulli draws from the class's
    conditional given the current rest. A dense block multiplies only the columns outside its
    own class (J[c, c] = 0: a complete k-partite model then costs what its couplings cost); a
    sparse one is a sparse matmul. Uniforms for several sweeps are drawn at once, as in
    `gibbs_sweeps`. `zt` is left untouched.

    With `exchange` (replica exchange): the columns are its K replicas of the chains, the
    blocks are at β = 1 and each column's inputs are scaled by its own β; after every sweep
    the replicas propose swaps with E(z) from `block_energies` and the columns are permuted.
    """
    if isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int) or num_sweeps < 1:
        raise ValueError(f"num_sweeps must be an int >= 1, got {num_sweeps!r}")
    zt = zt.clone()
    n, chains = zt.shape
    if exchange is not None and exchange.rows != chains:
        raise ValueError(f"the exchange has {exchange.rows} chain states, zt has {chains} columns")
    per_sweep = n * chains + (0 if exchange is None else exchange.uniforms)
    block = max(1, min(num_sweeps, block_bytes // max(1, per_sweep * zt.element_size())))
    storage, uniforms = uniform_buffer(block * per_sweep, zt.dtype, zt.device)
    uniforms = uniforms.view(block, per_sweep)
    u_swap = uniforms[:, n * chains :]
    beta = None if exchange is None else exchange.beta_rows.T  # (1, K·n): β of each column
    steps = []  # per class: its state rows, its uniforms, and how to compute its input
    for b in blocks:
        u = uniforms[:, b.start * chains : b.stop * chains].unflatten(1, (b.stop - b.start,
                                                                          chains))
        parts = [] if b.rows.is_sparse else [
            (b.rows[:, lo:hi], zt[lo:hi]) for lo, hi in ((0, b.start), (b.stop, n)) if hi > lo]
        steps.append((b, zt[b.start : b.stop], u, parts, zt.new_empty(b.stop - b.start, chains)))
    for first in range(0, num_sweeps, block):
        draw_uniforms(storage, generator)
        for i in range(min(block, num_sweeps - first)):
            for b, z_c, u, parts, pre in steps:
                if b.rows.is_sparse:
                    pre = torch.sparse.mm(b.rows, zt).add_(b.bias)
                elif parts:
                    (rows, rest), *more = parts
                    torch.addmm(b.bias, rows, rest, out=pre)
                    for rows, rest in more:
                        pre.addmm_(rows, rest)
                else:  # a class coupled to nothing
                    pre.copy_(b.bias.expand_as(pre))
                if beta is not None:
                    pre.mul_(beta)
                torch.lt(u[i], pre.sigmoid_(), out=z_c)
            if exchange is not None:
                perm = exchange.swap(block_energies(zt, blocks), u_swap[i])
                zt.copy_(zt[:, perm])
            cancel.check()  # a service's wall-time limit or shutdown stops the run here
    return zt


def block_energies(zt: torch.Tensor, blocks: Sequence[ColourBlock]) -> torch.Tensor:
    """E(z) of each chain (column of `zt`, kernel layout) from blocks built at β = 1. All
    dense: each coupling counted once, by the class of its lower end (the columns after the
    class only: a third of a full zᵀJz on a complete 4-partite model). Otherwise each class
    counts half of each of its couplings."""
    n, chains = zt.shape
    all_dense = not any(b.rows.is_sparse for b in blocks)
    energy = zt.new_zeros(chains)
    for b in blocks:
        z_c = zt[b.start : b.stop]
        energy.sub_((b.bias * z_c).sum(0))
        if all_dense:
            if b.stop < n:
                energy.sub_((z_c * (b.rows[:, b.stop :] @ zt[b.stop :])).sum(0))
        elif b.rows.is_sparse:
            energy.sub_(0.5 * (z_c * torch.sparse.mm(b.rows, zt)).sum(0))
        else:
            energy.sub_(0.5 * (z_c * (b.rows @ zt)).sum(0))
    return energy


def colour_gibbs_advance(generator: torch.Generator, zt: torch.Tensor,
                         params: Sequence[ColourBlock], num_sweeps: int, *,
                         exchange: ReplicaExchange | None = None) -> tuple[torch.Tensor, None]:
    """`colour_gibbs_sweeps` in the chain shell's shape (the state is also the sample)."""
    return colour_gibbs_sweeps(zt, params, num_sweeps, generator, exchange=exchange), None


def check_bm_precision(bm: BoltzmannMachine, dtype: torch.dtype, *, backend: str,
                       beta: float = 1.0) -> None:
    """`backends.numerics.check_precision` for a BoltzmannMachine: a unit's input is at most
    β (|b_i| + Σ_j |J_ij|), refused past what `dtype` resolves to within a nat."""
    coupling = bm.coupling.detach().double().abs()
    total = bm.bias.detach().double().abs()
    total = total.index_add(0, bm.edges[:, 0], coupling).index_add(0, bm.edges[:, 1], coupling)
    m, limit = beta * float(total.max()), precision_limit(dtype)
    if m <= limit:
        return
    name = str(dtype).removeprefix("torch.")
    fix = ("use dtype='float64'" if dtype != torch.float64 and m <= precision_limit(torch.float64)
           else "rescale the model (at this scale sampling is a search for the ground state: "
           "use neal)")
    raise ValueError(f"{backend}: the BoltzmannMachine's bias/coupling (times beta {beta:g}) "
                     f"give a unit an input of up to {m:.3g}, beyond {limit:.3g}, where {name} "
                     f"rounding errors exceed one nat and the samples would be rounding noise; "
                     f"{fix}")


class GibbsOptions(ChainOptions):
    num_sweeps: int = Field(10, ge=1, description="sweeps per call, and between successive "
                            "rounds when num_samples > num_chains")
    burn_in: int = Field(100, ge=0, description="sweeps run once when chains start: on the "
                         "first call, a new hidden-layer size, chain or replica count, every "
                         "call when persistent is false")
    beta: float = Field(1.0, gt=0, description="inverse temperature: samples follow "
                        "exp(-beta * E)")
    num_replicas: int = Field(1, ge=1, le=MAX_REPLICAS, description="replica exchange (parallel "
                              "tempering): each chain runs this many replicas on a geometric "
                              "ladder from beta down to beta * min_beta, adjacent ones proposing "
                              "to swap after every sweep, and the samples are the beta "
                              "replica's; work and memory scale with it. 1: plain Gibbs")
    min_beta: float = Field(0.3, gt=0, lt=1, description="the hottest replica's inverse "
                            "temperature as a fraction of beta: replica k runs at beta * "
                            "min_beta^(k / (num_replicas - 1)) (used when num_replicas > 1)")


class GibbsSampler(ChainSampler):
    """Block Gibbs with persistent chains (options: `GibbsOptions`).

    For an RBM the chain state is h (kept as "hidden" in checkpoints); for a BoltzmannMachine
    it is the full z in `variables` order (kept as "states"). `num_sweeps` sweeps per round.
    With `num_replicas` K > 1 the state has K · num_chains rows (replica-major) and checkpoints
    also hold "replicas" (K) and "swap_parity" (the next round of swap proposals).
    """

    name = "gibbs"
    Options = GibbsOptions
    capabilities = Capabilities(resource="cpu", output="binary", any_graph=True)
    round_option, step_word, chain_key = "num_sweeps", "sweeps", "hidden"
    replica_option = "num_replicas"
    #: Work model: every sweep costs each chain state (num_chains × num_replicas of them) its
    #: units + couplings, plus a fixed dispatch cost of ~20 µs (≈ 2·10^5 update-equivalents)
    #: however small the problem.
    STEP_COST, STEP_OVERHEAD = 1.0, 2e5
    #: Replica exchange: a state's sweep costs EXCHANGE_COST × as much (the swap's energies and
    #: gathers; measured 1.3-1.9x on RBMs, 2.5x on 4-partite models, whose energies take
    #: matmuls), and a sweep ~100 µs more dispatch (its ~30 small operations).
    EXCHANGE_COST, EXCHANGE_OVERHEAD = 2.5, 1e6

    @classmethod
    def state_bytes(cls, plan: Plan, num_samples: int, n_units: int, elem: int) -> float:
        """Chain state and matmul buffers (4 per chain state, 6 with replica exchange: a
        scaled input and the swap's gathers) plus each round's states kept (2 per state)."""
        rows = plan.rows
        buffers = 4 if plan.replicas == 1 else 6
        return float(elem * n_units * (buffers * rows + 2 * plan.rounds * rows)
                     + BLOCK_BYTES * 5 / 4)

    @classmethod
    def step_cost(cls, plan: Plan) -> tuple[float, float]:
        if plan.replicas == 1:
            return cls.STEP_COST, cls.STEP_OVERHEAD
        return cls.STEP_COST * cls.EXCHANGE_COST, cls.STEP_OVERHEAD + cls.EXCHANGE_OVERHEAD

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # which model the kept chains belong to: "rbm" (state h) or "bm" (state z); a call on
        # the other kind starts fresh chains even when the state's shape happens to match
        self._kind = "rbm"
        # the kept chains' replica count and the parity of their next round of swap proposals:
        # chains of another replica count restart, even when the state's shape matches
        self._replicas, self._swap_parity = self.options.num_replicas, 0

    def reset(self) -> None:
        super().reset()
        self._kind = "rbm"
        self._replicas, self._swap_parity = self.options.num_replicas, 0

    def state_dict(self) -> dict[str, Any]:
        """RBM chains: {"hidden", "generator"}; BoltzmannMachine chains: {"states",
        "generator"} (z in `variables` order); replica exchange adds {"replicas",
        "swap_parity"} (absent: plain chains, so earlier checkpoints load as K = 1)."""
        state = super().state_dict()
        if self._kind == "bm":
            state["states"] = state.pop(self.chain_key)
        if self._replicas > 1:
            state["replicas"], state["swap_parity"] = self._replicas, self._swap_parity
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "states" in state and state.get(self.chain_key) is not None:
            raise ValueError("sampler state has both 'hidden' (RBM chains) and 'states' "
                             "(BoltzmannMachine chains); the checkpoint is damaged")
        replicas, parity = state.get("replicas", 1), state.get("swap_parity", 0)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not (
                1 <= replicas <= MAX_REPLICAS):
            raise ValueError(f"sampler state 'replicas' must be an int from 1 to {MAX_REPLICAS}, "
                             f"got {replicas!r}; the checkpoint is damaged")
        if isinstance(parity, bool) or parity not in (0, 1):
            raise ValueError(f"sampler state 'swap_parity' must be 0 or 1, got {parity!r}; "
                             "the checkpoint is damaged")
        kind = "bm" if "states" in state else "rbm"
        if kind == "rbm":
            super().load_state_dict(state)
        else:
            try:
                super().load_state_dict({**state, self.chain_key: state["states"]})
            except ValueError as exc:  # name the key the checkpoint holds
                raise ValueError(str(exc).replace(f"{self.chain_key!r}", "'states'")) from None
        self._kind, self._replicas, self._swap_parity = kind, replicas, parity

    def _resume(self, kind: str, shape: tuple[int, int]) -> dict[str, Any] | None:
        same = kind == self._kind and self._replicas == self.options.num_replicas
        kept = self.chains.resume(shape) if same else None
        if self.chains.persistent:
            self._kind, self._replicas = kind, self.options.num_replicas
        return kept

    def _exchange(self, plan: Plan, fresh: bool) -> ReplicaExchange | None:
        """This call's replica exchange (None for plain Gibbs): the ladder, and the swap
        parity where the kept chains left it (0 for fresh chains)."""
        o = self.options
        if o.num_replicas == 1:
            return None
        return ReplicaExchange(ladder(o.beta, o.min_beta, o.num_replicas), plan.n_chains,
                               device=self.chains.device, dtype=self.chains.dtype,
                               parity=0 if fresh else self._swap_parity)

    def _keep_parity(self, exchange: ReplicaExchange | None) -> None:
        if exchange is not None and self.chains.persistent:
            self._swap_parity = exchange.parity

    def _info(self, plan: Plan, fresh: bool, n_units: int,
              exchange: ReplicaExchange | None) -> dict[str, Any]:
        """What both kernels report: the chains, β, the spin updates (every replica's), and
        with replica exchange the ladder and each adjacent pair's mean swap acceptance over
        the call's rounds."""
        o = self.options
        info = {
            **self.chain_info(plan, fresh),
            "beta": o.beta,
            "spin_updates": plan.steps(o.burn_in, o.num_sweeps, fresh) * plan.rows * n_units,
        }
        if exchange is not None:
            info.update(num_replicas=exchange.num_replicas, betas=exchange.betas.tolist(),
                        swap_acceptance=exchange.acceptance())
        return info

    def _sample_bm(self, bm: BoltzmannMachine, num_samples: int, *, seed: int | None,
                   timer: Timer) -> SampleSet:
        """Block Gibbs over the colour classes (see `colour_gibbs_sweeps`), any graph, with the
        same persistent chains, burn-in and rounds as the RBM kernel; the chain state is z."""
        if bm.n_edges == 0:  # independent units: exact draws, no chains needed
            return super()._sample_bm(bm, num_samples, seed=seed, timer=timer)
        o, chains = self.options, self.chains
        with timer("preprocess"):
            check_bm_precision(bm, chains.dtype, backend=self.name, beta=o.beta)
            gen = chains.generator(seed)
            # replica exchange scales each column by its own β: the blocks stay at β = 1
            unit_beta = o.beta if o.num_replicas == 1 else 1.0
            order, blocks = colour_blocks(bm, unit_beta, chains.device, chains.dtype)
            order = order.to(chains.device)
            position = torch.empty_like(order)
            position[order] = torch.arange(order.numel(), device=order.device)
            # z[:, order].T is the kernel's layout; a k-partite model's classes are usually
            # contiguous already, and then the gathers are skipped
            same = bool(torch.equal(order, torch.arange(order.numel(), device=order.device)))
            plan = self.plan(num_samples, bm.n_units)
            kept = self._resume("bm", (plan.rows, bm.n_units))
            exchange = self._exchange(plan, kept is None)
            advance = partial(colour_gibbs_advance, exchange=exchange)
        with timer("sample"):
            if kept is None:  # fresh chains from Bernoulli(½), burned in
                zt = torch.empty(bm.n_units, plan.rows, device=chains.device,
                                 dtype=chains.dtype)
                zt = torch.bernoulli(zt.fill_(0.5), generator=gen)
                zt, _, _ = burn_in(advance, gen, zt, blocks, o.burn_in)
            else:
                z = kept[self.chain_key]
                zt = (z if same else z[:, order]).T.contiguous()
            if exchange is not None:
                exchange.clear()
            zt, samples = run_rounds(advance, gen, zt, blocks, plan.rounds, o.num_sweeps)
            chains.keep(zt.T.contiguous() if same else zt.T[:, position])
            self._keep_parity(exchange)
        with timer("postprocess"):
            # the target replica's chains: the first n_chains columns of each round's state
            targets = [s[:, : plan.n_chains] for s, _ in samples]
            states = torch.cat([s.T for s in targets])[:num_samples]
            states = (states if same else states[:, position]).to(bm.bias.device,
                                                                   bm.bias.dtype)
            if unit_beta == 1 and states.dtype == chains.dtype and states.device == chains.device:
                # the blocks hold the model's own parameters: no second matrix to build
                energy = torch.cat([block_energies(s, blocks) for s in targets])
                energy = energy[:num_samples]
            else:
                energy = bm.sample_energy(states)
        info = {**self._info(plan, kept is None, bm.n_units, exchange),
                "colour_classes": len(blocks)}
        return SampleSet.of_states(states, energy, info)

    def _sample(self, rbm: RBM, num_samples: int, *, seed: int | None, timer: Timer) -> SampleSet:
        o, chains = self.options, self.chains
        with timer("preprocess"):
            check_precision(rbm, chains.dtype, backend=self.name, beta=o.beta)
            gen = chains.generator(seed)
            # replica exchange scales each row by its own β: the parameters stay at β = 1
            unit_beta = o.beta if o.num_replicas == 1 else 1.0
            params = [p.detach().to(chains.device, chains.dtype) * unit_beta for p in
                      (rbm.effective_weight(), rbm.visible_bias, rbm.hidden_bias)]
            plan = self.plan(num_samples, rbm.n_units)
            kept = self._resume("rbm", (plan.rows, rbm.n_hidden))
            exchange = self._exchange(plan, kept is None)
            advance = partial(gibbs_advance, exchange=exchange)
        with timer("sample"):
            if kept is None:  # fresh chains from Bernoulli(½), burned in
                h0 = torch.empty(plan.rows, rbm.n_hidden, device=chains.device,
                                 dtype=chains.dtype)
                h = torch.bernoulli(h0.fill_(0.5), generator=gen)
                h, _, _ = burn_in(advance, gen, h, params, o.burn_in)
            else:
                h = kept["hidden"]
            if exchange is not None:
                exchange.clear()
            h, samples = run_rounds(advance, gen, h, params, plan.rounds, o.num_sweeps)
            chains.keep(h)
            self._keep_parity(exchange)
        with timer("postprocess"):
            out_device, out_dtype = rbm.weight.device, rbm.weight.dtype
            n = plan.n_chains  # the target replica's chains: the first n rows of each round
            visible = torch.cat([v[:n] for _, v in samples])[:num_samples].to(out_device,
                                                                             out_dtype)
            hidden = torch.cat([h[:n] for h, _ in samples])[:num_samples].to(out_device,
                                                                            out_dtype)
            energy = energies(rbm, visible, hidden)
        info = self._info(plan, kept is None, rbm.n_units, exchange)
        return SampleSet(visible, hidden, energy, info)
