"""Test-set evaluation: discrete ELBO and the importance-weighted NLL with log Z.

NLL(x) ≈ −log (1/K) Σ_k p(x|z_k) exp(−E(z_k)) / (Z q(z_k|x)), z_k ~ q(z|x), with log Z exact when
the smaller RBM layer has at most `eval.exact_limit_units` units and AIS otherwise — the protocol
of the published binarized-MNIST tables. The uncertainty of log Z shifts every example's NLL by
the same amount, so it is reported separately from the sampling error over examples.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qvae.config import Config
from qvae.datasets import load_dataset
from qvae.dvae import DVAE
from qvae.logz import ais_log_partition, exact_log_partition, log_partition


def estimate_log_z(model: DVAE, cfg: Config, *, progress: bool = False) -> dict[str, Any]:
    e = cfg.eval
    ais = {"num_betas": e.ais_betas, "num_runs": e.ais_runs, "seed": cfg.seed,
           "progress": progress}
    if e.logz == "exact":
        value = exact_log_partition(model.prior)
        return {"log_z": value, "log_z_std": 0.0, "method": "exact"}
    if e.logz == "ais":
        res = ais_log_partition(model.prior, **ais)
        return {"log_z": res.log_z, "log_z_std": res.log_z_std, "method": "ais",
                "ais_num_betas": res.num_betas, "ais_num_runs": res.num_runs,
                "ais_effective_sample_size": res.effective_sample_size}
    est = log_partition(model.prior, exact_limit_units=e.exact_limit_units, **ais)
    return {"log_z": est.log_z, "log_z_std": est.log_z_std, "method": est.method}


@torch.no_grad()
def evaluate_model(
    model: DVAE, cfg: Config, out_path: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Evaluate on `cfg.eval.split`; write JSON to `out_path` when given; return the dict."""
    from tqdm.auto import tqdm

    model.eval()
    start = time.perf_counter()
    data = load_dataset(cfg.data.dataset, cfg.eval.split)
    if cfg.eval.max_examples is not None:
        data = data[: cfg.eval.max_examples]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    if model.needs_negative_phase:
        logz = estimate_log_z(model, cfg, progress=progress)
        log_z = logz["log_z"]

        def bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (model.discrete_elbo(x, log_z, num_samples=1, generator=gen),
                    model.iw_bound(x, log_z, num_samples=cfg.eval.num_iw, generator=gen))
    else:  # SDE-VAE: a path-measure bound of the discretised model, no partition function
        logz = {"log_z": None, "log_z_std": 0.0, "method": "none (path measure, no log Z)"}

        def bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (model.elbo(x, num_samples=1, generator=gen),
                    model.iw_bound(x, num_samples=cfg.eval.num_iw, generator=gen))

    elbos, iws = [], []
    bs = cfg.data.eval_batch_size
    for i in tqdm(range(0, len(data), bs), disable=not progress, desc="evaluate", unit="batch"):
        elbo_b, iw_b = bounds(data[i : i + bs].to(device))
        elbos.append(elbo_b.cpu())
        iws.append(iw_b.cpu())
    elbo, iw = torch.cat(elbos).double(), torch.cat(iws).double()
    n = len(iw)
    result = {
        "split": cfg.eval.split,
        "num_examples": n,
        "num_iw": cfg.eval.num_iw,
        "elbo": float(elbo.mean()),
        "nll": float(-iw.mean()),
        "nll_stderr_examples": float(iw.std() / math.sqrt(n)) if n > 1 else 0.0,
        "nll_spread_from_log_z": logz["log_z_std"],
        **logz,
        "seconds": time.perf_counter() - start,
    }
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2))
    return result
