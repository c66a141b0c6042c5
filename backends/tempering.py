"""Replica exchange (parallel tempering) for the `gibbs` kernels: the β ladder and the swaps.

Block Gibbs at the target β cannot cross an energy barrier of height ΔE in fewer than about
exp(β ΔE) sweeps, so on a strongly coupled model its chains stay in the mode they started in and
the samples get the modes' weights wrong. Replica exchange runs K copies of every chain on a
geometric ladder β_k = β · r^(k/(K−1)), k = 0..K−1 (r = `min_beta`, replica 0 the target): the
hot replicas cross barriers easily, and after every sweep adjacent replicas (k, k+1) of the same
chain propose to exchange their configurations, accepted with probability

    min(1, exp((β_k − β_{k+1}) (E_k − E_{k+1})))          (E at β = 1, p_k ∝ exp(−β_k E)),

the Metropolis ratio of the product Π_k exp(−β_k E(x_k)), which the exchange therefore leaves
invariant: each replica keeps its own law, and configurations found hot travel down to the
target. The proposals alternate between the even pairs (0-1, 2-3, …) and the odd pairs (1-2,
3-4, …) from one sweep to the next (the deterministic even-odd schedule: configurations move
along the ladder in runs instead of by a random walk).

Layout: the K·n chain states are replica-major (states k·n … (k+1)·n − 1 are replica k, so the
target's chains are the first n), and an exchange is a permutation of them that the kernel
applies to its own state (rows of the RBM kernel's h, columns of the colour kernel's zᵀ).

>>> ladder(1.0, 0.25, 3)
[1.0, 0.5, 0.25]
>>> ex = ReplicaExchange(ladder(1.0, 0.25, 3), n_chains=2, device="cpu", dtype=torch.float32)
>>> energy = torch.tensor([0, 0, -8, -8, 0, 0.])  # replica 1 holds a lower state
>>> ex.swap(energy, torch.full((4,), 0.5)).tolist()  # even round: pair 0-1 swaps, certainly
[2, 3, 0, 1, 4, 5]
>>> ex.parity, ex.acceptance()
(1, [1.0, 0.1353352814912796])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ladder(beta: float, min_beta: float, num_replicas: int) -> list[float]:
    """β_k = beta · min_beta^(k/(K−1)), k = 0..K−1: geometric, so that adjacent replicas
    overlap about equally where the heat capacity is flat; [beta] for K = 1."""
    if num_replicas == 1:
        return [beta]
    return [beta * min_beta ** (k / (num_replicas - 1)) for k in range(num_replicas)]


class ReplicaExchange:
    """The swap moves of one call: the ladder on the chains' device, the parity of the next
    round of proposals (it carries over from sweep to sweep and call to call, so the even-odd
    alternation never restarts), and the acceptance tallies.

    `beta_rows` is the (K·n, 1) column of each chain state's β: the kernels run at β = 1 and
    scale every state's inputs by its own β, one matmul for all replicas.
    """

    def __init__(self, betas: Sequence[float], n_chains: int, *, device: torch.device | str,
                 dtype: torch.dtype, parity: int = 0) -> None:
        if len(betas) < 2:
            raise ValueError(f"replica exchange needs at least 2 replicas, got {len(betas)}")
        self.num_replicas, self.n_chains, self.parity = len(betas), n_chains, parity
        self.betas = torch.tensor(list(betas), device=device, dtype=dtype)
        self.beta_rows = self.betas.repeat_interleave(n_chains).unsqueeze(1)
        self._gaps = (self.betas[:-1] - self.betas[1:]).unsqueeze(1)  # β_k − β_{k+1} > 0
        self._identity = torch.arange(self.rows, device=device).view(self.num_replicas, n_chains)
        pairs = torch.arange(self.num_replicas - 1, device=device).unsqueeze(1) % 2
        self._proposed = (pairs == 0, pairs == 1)  # (K−1, 1): the pairs of each parity
        # row k + 1 holds 1 where pair (k, k+1) swaps; rows 0 and K stay 0 (no such pair)
        self._swapped = torch.zeros(self.num_replicas + 1, n_chains, device=device,
                                    dtype=torch.int64)
        self.clear()

    @property
    def rows(self) -> int:
        """Chain states the kernel runs: K · n."""
        return self.num_replicas * self.n_chains

    @property
    def uniforms(self) -> int:
        """Uniforms a round of proposals takes: one per pair and chain, both parities' pairs,
        so the kernel's per-sweep layout of draws is fixed (the idle parity's go unused)."""
        return (self.num_replicas - 1) * self.n_chains

    def clear(self) -> None:
        """Zero the tallies (after burn-in: the call's acceptance is measured on its rounds)."""
        self._accepted = torch.zeros(self.num_replicas - 1, self.n_chains, dtype=torch.float64,
                                     device=self._identity.device)
        self._rounds = 0

    def swap(self, energy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The permutation of the K·n chain states made by one round of proposals.

        `energy`: (K·n,) E of each state at β = 1; `u`: `uniforms` fresh U(0, 1) draws. Pairs
        (k, k+1) with k of this round's parity exchange their states where u < min(1, e^a),
        a = (β_k − β_{k+1})(E_k − E_{k+1}); a state of the result is `state[perm]`. Every
        pair's acceptance probability is tallied, proposed this round or not (a Rao–Blackwell
        estimate of its rate, defined for every pair whatever the number of sweeps). A few
        whole-tensor operations, no host synchronisation: cheap beside a sweep on a GPU too.
        """
        k, n = self.num_replicas, self.n_chains
        e = energy.view(k, n)
        prob = torch.sub(e[:-1], e[1:]).mul_(self._gaps).clamp_(max=0).exp_()  # (K−1, n)
        self._accepted.add_(prob)
        self._rounds += 1
        swapped = self._swapped[1:-1]
        torch.logical_and(u.view(k - 1, n) < prob, self._proposed[self.parity], out=swapped)
        self.parity ^= 1
        # replica k moves to k + 1 where its upper pair swaps, to k − 1 where its lower one does
        shift = torch.sub(self._swapped[1:], self._swapped[:-1]).mul_(n)
        return shift.add_(self._identity).view(-1)

    def acceptance(self) -> list[float]:
        """Mean swap acceptance probability of each adjacent pair (0-1, 1-2, …) over every
        chain and round since `clear`: a pair far below ~0.2 marks a gap in the ladder (more
        replicas or a larger min_beta), one near 1 a replica to spare."""
        rounds = max(1, self._rounds) * self.n_chains
        return (self._accepted.sum(1) / rounds).tolist()
