"""`gibbs`: vectorised block Gibbs in torch with persistent chains (PCD).

A sweep is v ~ p(v | h) then h ~ p(h | v) for every chain at once; the chain state is h. Chains
persist across calls for the same RBM shape (and are re-initialised and burned in when the shape,
chain count, device or dtype changes), so a trainer pays burn-in once and `num_sweeps` per call.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from backends.base import Sampler, SampleSet, Timer, energies, make_generator
from qvae.rbm import RBM

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def gibbs_sweeps(
    h: torch.Tensor,
    weight: torch.Tensor,
    visible_bias: torch.Tensor,
    hidden_bias: torch.Tensor,
    num_sweeps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `num_sweeps` block-Gibbs sweeps from hidden state `h`; return the last (v, h).

    The kernel: a plain function of tensors (β already folded into the parameters).
    """
    n, nv = h.shape[0], weight.shape[0]
    v = h.new_empty(n, nv)
    for _ in range(num_sweeps):
        v = torch.bernoulli(torch.sigmoid(torch.addmm(visible_bias, h, weight.T)), generator=generator)
        h = torch.bernoulli(torch.sigmoid(torch.addmm(hidden_bias, v, weight)), generator=generator)
    return v, h


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
            if seed is not None or self._generator is None:
                self._generator = make_generator(seed, self.device)
            gen = self._generator
            params = [p.detach().to(self.device, self.dtype) * self.beta for p in
                      (rbm.effective_weight(), rbm.visible_bias, rbm.hidden_bias)]
            n_chains = self.num_chains or num_samples
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
