"""Request and response bodies of the sampler service (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RBMProblem(Body):
    """E(v, h) = −bᵀv − cᵀh − vᵀWh over v ∈ {0,1}^nv, h ∈ {0,1}^nh."""

    weight: list[list[float]] = Field(..., min_length=1,
                                      description="W as nv rows of nh couplings")
    visible_bias: list[float] = Field(..., min_length=1, description="b, length nv")
    hidden_bias: list[float] = Field(..., min_length=1, description="c, length nh")


class SampleRequest(Body):
    backend: str = Field(..., description="backend to sample with: see GET /v1/backends",
                         examples=["gibbs"])
    num_samples: int = Field(..., ge=1, description="number of samples", examples=[100])
    options: dict[str, Any] = Field(default_factory=dict, description="backend options")
    rbm: RBMProblem | None = Field(None, description="an RBM problem (or give `bqm`)")
    bqm: dict[str, Any] | None = Field(
        None, description="a general Ising/QUBO model, as dimod's "
        "BinaryQuadraticModel.to_serializable() writes it")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same samples")
    mode: Literal["auto", "inline", "job"] = Field(
        "auto", description="inline: answer in this response; job: return a job id; auto: a job "
        "when the request is large")
    return_continuous: bool = Field(False, description="langevin/mala: the unrounded state too")

    @model_validator(mode="after")
    def _one_problem(self) -> SampleRequest:
        if (self.rbm is None) == (self.bqm is None):
            raise ValueError("give exactly one of `rbm` and `bqm`")
        return self


class SampleResult(BaseModel):
    request_id: str
    backend: str = Field(..., description="backend requested")
    served_by: str = Field(..., description="backend that actually served it (e.g. a fallback)")
    vartype: Literal["BINARY", "SPIN"]
    variables: list[Any] = Field(..., description="column labels of `samples`")
    num_visible: int | None = Field(None, description="rbm: the first num_visible columns are v")
    samples: list[list[int]]
    energies: list[float]
    continuous: list[list[float]] | None = None
    info: dict[str, Any] = Field(..., description="timing, beta_eff, chain breaks, QPU time, …")


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    location: str


class JobError(BaseModel):
    status_code: int
    detail: Any


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    result: SampleResult | None = None
    error: JobError | None = None
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None


class BackendInfo(BaseModel):
    available: bool
    reason: str
    allowed: bool = Field(..., description="this key may use it")
    binary: bool
    resource: Literal["qpu", "cpu", "network"] = Field(
        ..., description="what a call consumes (the backend's declared capabilities): qpu: the "
        "one shared annealer, served one request at a time; cpu: this service's workers")
    general_bqm: bool = Field(False, description="it also samples BQMs that are not RBMs")
    options: list[str]
    locked_options: list[str]


class BackendList(BaseModel):
    backends: dict[str, BackendInfo]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    queued: int
    running: int


class ErrorBody(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a body that is not UTF-8 JSON text"},
    401: {"model": ErrorBody, "description": "no or unknown API key"},
    403: {"model": ErrorBody, "description": "this key may not use the backend or option"},
    413: {"model": ErrorBody, "description": "request body or problem over the limits"},
    429: {"model": ErrorBody, "description": "queue full (Retry-After) or QPU budget spent"},
    503: {"model": ErrorBody, "description": "draining or backend unavailable (Retry-After)"},
}
