"""Request and response bodies of the sampler service (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

MAX_SEED = 2**63 - 1
#: At most this many clamped units in one request (a service's `limits.max_variables` bounds
#: it further: every key must be a unit index of the problem).
MAX_CLAMP = 2**20
#: Unit indices: strict (no 3.0, no "3"), and a clamp's keys in canonical form (no "03" next
#: to "3": two spellings of one unit are a mistake, not a choice).
UnitIndex = Annotated[int, Field(strict=True, ge=0)]
ClampKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]
ClampValue = Annotated[int, Field(strict=True, ge=0, le=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RBMProblem(Body):
    """E(v, h) = −bᵀv − cᵀh − vᵀWh over v ∈ {0,1}^nv, h ∈ {0,1}^nh."""

    weight: list[list[float]] = Field(..., min_length=1,
                                      description="W as nv rows of nh couplings")
    visible_bias: list[float] = Field(..., min_length=1, description="b, length nv")
    hidden_bias: list[float] = Field(..., min_length=1, description="c, length nh")


class BMProblem(Body):
    """A Boltzmann machine on any graph (`qvae.BoltzmannMachine`): E(z) = −b·z − Σ_k J_k z_i z_j
    over z ∈ {0,1}^n in unit-index order, with edge k = [i, j] coupling units i and j."""

    bias: list[float] = Field(..., min_length=1,
                              description="b, one per unit: its length is the number of units n")
    edges: list[tuple[UnitIndex, UnitIndex]] = Field(
        default_factory=list, description="coupled unit pairs [i, j]: indices in 0..n-1, i ≠ j, "
        "each pair once")
    coupling: list[float] = Field(default_factory=list, description="J, one per edge")
    variables: list[StrictInt | StrictStr] | None = Field(
        None, description="unit labels, returned as the samples' column labels (default "
        "0..n-1); `clamp` and `edges` use unit indices, not labels")
    parts: list[list[UnitIndex]] | None = Field(
        None, description="optional colouring: independent sets that partition the units (e.g. "
        "the parts of a k-partite model); default: 2 colours for a bipartite graph, a greedy "
        "colouring otherwise")


class SampleRequest(Body):
    backend: str = Field(..., description="backend to sample with: see GET /v1/backends",
                         examples=["gibbs"])
    num_samples: int = Field(..., ge=1, description="number of samples", examples=[100])
    options: dict[str, Any] = Field(default_factory=dict, description="backend options")
    rbm: RBMProblem | None = Field(None, description="an RBM problem (or give `bm` or `bqm`)")
    bm: BMProblem | None = Field(None, description="a Boltzmann machine on any graph")
    bqm: dict[str, Any] | None = Field(
        None, description="a general Ising/QUBO model, as dimod's "
        "BinaryQuadraticModel.to_serializable() writes it")
    clamp: dict[ClampKey, ClampValue] | None = Field(
        None, max_length=MAX_CLAMP, description="`rbm` or `bm`: units held fixed, unit index → "
        "0 or 1 (index in z = [v, h] for an RBM, in unit order for a BM); the samples are exact "
        "draws of the conditional given them, and hold them", examples=[{"0": 1}])
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same samples")
    mode: Literal["auto", "inline", "job"] = Field(
        "auto", description="inline: answer in this response; job: return a job id; auto: a job "
        "when the request is large")
    return_continuous: bool = Field(False, description="langevin/mala: the unrounded state too")

    @field_validator("clamp", mode="after")
    @classmethod
    def _indices(cls, clamp: dict[str, int] | None) -> dict[int, int] | None:
        return None if clamp is None else {int(k): v for k, v in clamp.items()}

    @model_validator(mode="after")
    def _one_problem(self) -> SampleRequest:
        if sum(p is not None for p in (self.rbm, self.bm, self.bqm)) != 1:
            raise ValueError("give exactly one of `rbm`, `bm` and `bqm`")
        return self

    def problem_field(self) -> str:
        """The name of the problem given: "rbm", "bm" or "bqm" (for errors naming it)."""
        return "rbm" if self.rbm is not None else "bm" if self.bm is not None else "bqm"


class SampleResult(BaseModel):
    request_id: str
    backend: str = Field(..., description="backend requested")
    served_by: str = Field(..., description="backend that actually served it (e.g. a fallback)")
    vartype: Literal["BINARY", "SPIN"]
    variables: list[Any] = Field(..., description="column labels of `samples`: unit indices "
                                 "for an RBM, a BM's `variables` (default its unit indices)")
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
    any_graph: bool = Field(False, description="it samples Boltzmann machines on any graph "
                            "(`bm`, or a `bqm` with an odd cycle); every backend samples "
                            "bipartite ones")
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
