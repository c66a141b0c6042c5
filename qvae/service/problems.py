"""Problems in (JSON → RBM, BoltzmannMachine or dimod BQM, errors naming the field) and results
out (JSON bytes)."""

from __future__ import annotations

import math
from typing import Any

import dimod
import numpy as np
import orjson
import torch

from backends.base import SampleSet
from backends.bqm import BQMSamples, check_bqm
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM
from qvae.service.jobs import ServiceError
from qvae.service.schemas import BMProblem, RBMProblem, SampleRequest


def field_error(loc: list[Any], msg: str, status_code: int = 422) -> ServiceError:
    """A FastAPI-shaped validation error naming the field at `loc`."""
    return ServiceError(status_code, [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def problem_size(req: SampleRequest) -> int:
    """Number of variables, read cheaply before anything is built."""
    if req.rbm is not None:
        return len(req.rbm.visible_bias) + len(req.rbm.hidden_bias)
    if req.bm is not None:
        return len(req.bm.bias)
    return len((req.bqm or {}).get("variable_labels", ()) or ())


def problem_couplings(req: SampleRequest) -> int | None:
    """Couplings listed by a `bm` or `bqm` problem, read cheaply before anything is built
    (None for an RBM: its nv × nh couplings are bounded by `max_variables` and the body)."""
    if req.bm is not None:
        return len(req.bm.edges)
    if req.bqm is not None:
        heads = req.bqm.get("quadratic_head", ())
        return len(heads) if isinstance(heads, (list, tuple)) else 0
    return None


def check_clamp_indices(clamp: dict[int, int] | None, n_units: int, problem: str) -> None:
    """422 naming the first clamped index outside the problem's units (values are checked to be
    0/1 by the schema)."""
    for index in sorted(clamp or ()):
        if index >= n_units:
            raise field_error(["clamp", str(index)], f"unit index {index} is out of range: the "
                              f"{problem} has {n_units} units, indices 0..{n_units - 1}")


def build_rbm(problem: RBMProblem) -> RBM:
    nv, nh = len(problem.visible_bias), len(problem.hidden_bias)
    if len(problem.weight) != nv:
        raise field_error(["rbm", "weight"], f"has {len(problem.weight)} rows; visible_bias has "
                          f"{nv} entries, so it needs {nv} rows")
    for i, row in enumerate(problem.weight):
        if len(row) != nh:
            raise field_error(["rbm", "weight", i], f"row {i} has {len(row)} entries; "
                              f"hidden_bias has {nh}, so every row needs {nh}")
    rbm = RBM(nv, nh, init_std=0.0, dtype=torch.float64)
    with torch.no_grad():
        rbm.weight.copy_(torch.tensor(problem.weight, dtype=torch.float64))
        rbm.visible_bias.copy_(torch.tensor(problem.visible_bias, dtype=torch.float64))
        rbm.hidden_bias.copy_(torch.tensor(problem.hidden_bias, dtype=torch.float64))
    return rbm


def build_bm(problem: BMProblem) -> BoltzmannMachine:
    """The BoltzmannMachine (float64) of a `bm` payload, or 422 naming the field at fault."""
    n, m = len(problem.bias), len(problem.edges)
    if len(problem.coupling) != m:
        raise field_error(["bm", "coupling"], f"has {len(problem.coupling)} values; edges has "
                          f"{m} pairs, so it needs {m} (one coupling per edge)")
    if problem.variables is not None and len(problem.variables) != n:
        raise field_error(["bm", "variables"], f"has {len(problem.variables)} labels; bias has "
                          f"{n} entries, so it needs {n} (one label per unit)")
    for k, (i, j) in enumerate(problem.edges):
        if i >= n or j >= n:
            raise field_error(["bm", "edges", k], f"edge [{i}, {j}] names a unit index out of "
                              f"range: bias has {n} entries, so indices are 0..{n - 1}")
        if i == j:
            raise field_error(["bm", "edges", k], f"edge [{i}, {j}] is a self-loop: a Boltzmann "
                              "machine has none (z² = z for {0,1} units: put it in the bias)")
    edges = torch.tensor(problem.edges, dtype=torch.int64).reshape(m, 2)
    try:
        return BoltzmannMachine(
            problem.variables if problem.variables is not None else n, edges,
            bias=torch.tensor(problem.bias, dtype=torch.float64),
            coupling=torch.tensor(problem.coupling, dtype=torch.float64).reshape(m),
            parts=problem.parts, dtype=torch.float64)
    except ValueError as exc:  # a repeated label, a repeated edge, parts that are no colouring
        msg = str(exc)
        where = ("parts" if "part" in msg else "variables" if "label" in msg
                 else "edges" if "edge" in msg else None)
        raise field_error(["bm", where] if where else ["bm"], msg) from None


def build_bqm(serial: dict[str, Any]) -> dimod.BinaryQuadraticModel:
    try:
        bqm = dimod.BinaryQuadraticModel.from_serializable(serial)
    except Exception as exc:  # noqa: BLE001 - dimod raises many types for malformed input
        raise field_error(["bqm"], "not a dimod BinaryQuadraticModel.to_serializable() dict: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        check_bqm(bqm)
    except ValueError as exc:
        raise field_error(["bqm"], str(exc)) from None
    return bqm


def jsonable(obj: Any) -> Any:
    """Backend info as plain JSON: numpy/torch to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def encode(request_id: str, backend: str, out: SampleSet | BQMSamples,
           extra_info: dict[str, Any], with_continuous: bool,
           labels: list[Any] | None = None) -> bytes:
    """The result body as compact JSON bytes: a SampleResult for an RBM or a BM (`labels`: the
    BM's variables, the columns of its samples), and for a BQM
    `dimod.SampleSet.to_serializable()` plus request_id, backend and served_by."""
    if isinstance(out, SampleSet):
        samples = out.states.detach().cpu().to(torch.int8).numpy()
        energies = out.energy.detach().cpu().double().numpy()
        variables: list[Any] = list(range(samples.shape[1])) if labels is None else labels
        vartype, num_visible = "BINARY", out.visible.shape[1] if out.layered else None
        cont = None if out.continuous is None else out.continuous.detach().cpu().numpy()
    else:  # a BQM: dimod's own format, so dimod.SampleSet.from_serializable(body) loads it
        info = {**out.info, **extra_info}
        served_by = str(info.setdefault("served_by", backend))
        if with_continuous and out.continuous is not None:
            info["continuous"] = out.continuous
        sampleset = dimod.SampleSet.from_samples(
            (out.samples, out.variables), out.vartype, energy=out.energies,
            info=jsonable(info), sort_labels=False)
        return orjson.dumps({**sampleset.to_serializable(), "request_id": request_id,
                             "backend": backend, "served_by": served_by})
    info = {**out.info, **extra_info}
    served_by = str(info.setdefault("served_by", backend))
    body = {"request_id": request_id, "backend": backend, "served_by": served_by,
            "vartype": vartype, "variables": jsonable(variables), "num_visible": num_visible,
            "samples": np.ascontiguousarray(samples, np.int8),
            "energies": np.ascontiguousarray(energies, np.float64),
            "continuous": (np.ascontiguousarray(cont, np.float64)
                           if (with_continuous and cont is not None) else None),
            "info": jsonable(info)}
    # orjson writes the arrays directly (NaN as null), several times faster than json.dumps
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
