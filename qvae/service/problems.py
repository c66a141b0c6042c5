"""Problems in (JSON → RBM or dimod BQM, errors naming the field) and results out (JSON bytes)."""

from __future__ import annotations

import math
from typing import Any

import dimod
import numpy as np
import orjson
import torch

from backends.base import SampleSet
from backends.bqm import BQMSamples, check_bqm
from qvae.rbm import RBM
from qvae.service.jobs import ServiceError
from qvae.service.schemas import RBMProblem


def field_error(loc: list[Any], msg: str, status_code: int = 422) -> ServiceError:
    """A FastAPI-shaped validation error naming the field at `loc`."""
    return ServiceError(status_code, [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def problem_size(rbm: RBMProblem | None, bqm: dict[str, Any] | None) -> int:
    """Number of variables, read cheaply before anything is built."""
    if rbm is not None:
        return len(rbm.visible_bias) + len(rbm.hidden_bias)
    return len((bqm or {}).get("variable_labels", ()) or ())


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
           extra_info: dict[str, Any], with_continuous: bool) -> bytes:
    """The result body as compact JSON bytes: a SampleResult for an RBM, and for a BQM
    `dimod.SampleSet.to_serializable()` plus request_id, backend and served_by."""
    if isinstance(out, SampleSet):
        samples = out.states.detach().cpu().to(torch.int8).numpy()
        energies = out.energy.detach().cpu().double().numpy()
        variables: list[Any] = list(range(samples.shape[1]))
        vartype, num_visible = "BINARY", out.visible.shape[1]
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
