"""The sampler service: every backend behind one authenticated HTTP API.

`create_app(config)` builds the FastAPI app; `qvae serve` runs it under uvicorn. A request is
checked completely (key, backend permission, sizes, problem, options, QPU budget) before it is
queued, so no worker — and no QPU second — is spent on a request that was going to fail.
"""

import asyncio
import json
import sys
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

import backends
from backends.base import ProblemShape, Sampler
from backends.bqm import (
    NotBipartite,
    any_graph_backends,
    bipartition,
    sample_bqm,
    samples_any_graph,
)
from backends.dwave import QPUBudgetExceeded
from backends.options import OptionError
from backends.registry import option_names, parse_options, sampler_class
from qvae.boltzmann import BoltzmannMachine
from qvae.rbm import RBM
from qvae.service.accounts import Keys, Ledger, Reservation
from qvae.service.guard import Guard
from qvae.service.jobs import Job, Scheduler, ServiceError
from qvae.service.metrics import Metrics
from qvae.service.problems import (
    build_bm,
    build_bqm,
    build_rbm,
    check_clamp_indices,
    encode,
    field_error,
    jsonable,
    problem_couplings,
    problem_size,
)
from qvae.service.schemas import (
    ERRORS,
    BackendInfo,
    BackendList,
    Health,
    JobAccepted,
    JobStatus,
    SampleRequest,
    SampleResult,
)
from qvae.service.settings import KeyConfig, ServiceConfig
from qvae.service.store import SQLiteStore, Store, StoreError, key_account

#: The service limit each quantity of a backend's work model is held to (`Sampler.work`).
WORK_LIMITS = {"work": "max_work", "state_bytes": "max_state_bytes",
               "enumerated_states": "max_enumerated_states", "qpu_seconds": "max_request_qpu_s",
               "seconds": "max_job_seconds"}
OPEN_KEY = KeyConfig(key="no-auth-open", name="anonymous")  # require_auth: false
SHARED_SAMPLERS = 8  # QPU samplers kept warm (embedding, β_eff) per distinct option set
# the service's ledger counts QPU time, not each cached sampler: these stay out of the sampler
SERVICE_BUDGET_OPTIONS = ("qpu_time_budget_s", "on_budget")
RESULT_OVERHEAD_BYTES = 64 * 2**10  # a result's info, labels and framing, beyond its arrays


def result_bytes_bound(num_samples: int, n_vars: int, continuous: bool, body_bytes: int) -> int:
    """Upper bound of an encoded SampleResult: per sample a row of "-1," (3 bytes a variable),
    an energy (≤ 26 bytes with its comma), 25 bytes a float of `continuous`; the request body
    bounds the variable labels."""
    per_sample = 3 * n_vars + 28 + (25 * n_vars + 2 if continuous else 0)
    return num_samples * per_sample + RESULT_OVERHEAD_BYTES + body_bytes


class Service:
    """State shared by the endpoints: keys, ledger, scheduler, metrics, warm QPU samplers."""

    def __init__(self, config: ServiceConfig, store: Store | None = None):
        """`store`: the ledger and job index (default: SQLite at `state_db`, or in memory)."""
        self.config = config
        self.keys = Keys(config.all_keys())
        if config.require_auth and not len(self.keys):
            raise ValueError("no API keys: put keys in the service config or set QVAE_API_KEYS "
                             "(comma-separated), or set require_auth: false for a private "
                             "loopback service")
        self.store = store if store is not None else SQLiteStore(config.state_db)
        self.store.release_dead()  # holds of a crashed predecessor would block budgets forever
        if config.ledger_path is not None:
            self._import_ledger(config.ledger_path)
        # checked (> 0) by dwave's Options model when the service config was loaded
        server_budget = config.policy("dwave").options.get("qpu_time_budget_s")
        self.ledger = Ledger(self.store, server_budget)
        self.result_lock = threading.Lock()
        self.result_pending = 0  # bytes of results of admitted jobs not yet stored (bounds)
        self.metrics = Metrics()
        lim = config.limits
        self.scheduler = Scheduler({"cpu": (lim.cpu_workers, lim.cpu_queue),
                                    "qpu": (1, lim.qpu_queue)},
                                   config.job_ttl_s, self.store,
                                   initializer=lambda: torch.set_num_threads(lim.torch_threads),
                                   max_job_seconds=lim.max_job_seconds)
        for name, res in self.scheduler.resources.items():
            self.metrics.watch(name, lambda r=res: r.outstanding - r.running,
                               lambda r=res: r.running)
        self.metrics.jobs_stored.set_function(lambda: len(self.scheduler.jobs))
        self.shared: OrderedDict[str, tuple[Sampler, threading.Lock]] = OrderedDict()
        self.shared_lock = threading.Lock()

    def _import_ledger(self, path: Any) -> None:
        """Carry an old JSON ledger's spent seconds into the store once, then rename it."""
        if not path.is_file():
            return
        try:
            seconds = {key_account(str(k)): float(v) for k, v in
                       json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise StoreError(f"the old QPU ledger {path} (ledger_path) is unreadable ({exc}): "
                             "fix it, or remove ledger_path from the service config") from None
        done = path.with_name(path.name + ".imported")
        path.rename(done)  # first: a crash in between loses the import rather than doubling it
        self.store.add_used(seconds)
        print(f"qvae serve: imported the QPU ledger {path} into {self.config.state_db}; "
              f"the old file is now {done}", file=sys.stderr)

    def reserve_result_space(self, req: SampleRequest, body_bytes: int) -> int:
        """Hold room for a fetch-by-id job's result under limits.max_stored_result_bytes, or
        raise 429: unfetched results never pile up past the cap (they are refused, not
        evicted). Returns the bytes held; give them back with `release_result_space`."""
        n_vars = problem_size(req)
        bound = result_bytes_bound(req.num_samples, n_vars, req.return_continuous, body_bytes)
        cap = self.config.limits.max_stored_result_bytes
        with self.result_lock:
            stored = self.store.result_bytes()
            if stored + self.result_pending + bound > cap:
                raise ServiceError(
                    429, f"stored results not yet fetched ({stored / 2**20:.1f} MiB) and those "
                    f"of jobs running ({self.result_pending / 2**20:.1f} MiB) leave no room for "
                    f"this job's (up to {bound / 2**20:.1f} MiB) under the service's "
                    f"limits.max_stored_result_bytes ({cap / 2**20:.1f} MiB): fetch finished "
                    "jobs (GET /v1/jobs/ID), ask for fewer samples, or retry later",
                    {"Retry-After": "10"})
            self.result_pending += bound
        return bound

    def release_result_space(self, held: int) -> None:
        with self.result_lock:
            self.result_pending -= held

    # ----------------------------------------------------------------- request checks
    def caller(self, creds: HTTPAuthorizationCredentials | None) -> KeyConfig:
        if not self.config.require_auth:
            return OPEN_KEY
        if creds is None:
            raise ServiceError(401, "missing API key: send the header 'Authorization: Bearer "
                               "KEY'", {"WWW-Authenticate": "Bearer"})
        key = self.keys.get(creds.credentials)
        if key is None:
            raise ServiceError(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
        return key

    def sampler(self, backend: str, options: Any) -> tuple[Sampler, threading.Lock]:
        """A fresh sampler (CPU backends: requests stay independent and reproducible), or the
        shared warm one for QPU backends, whose embedding and β_eff every caller reuses.
        `options` are the request's, already parsed by the backend's Options model."""
        cls = sampler_class(backend)
        options = dict(options)  # the parsed values, as the constructor's keywords
        try:
            if cls.capabilities.resource != "qpu":
                return cls(**options), threading.Lock()
            options = {k: v for k, v in options.items() if k not in SERVICE_BUDGET_OPTIONS}
            ident = json.dumps(options, sort_keys=True, default=str)
            with self.shared_lock:
                if ident not in self.shared:
                    self.shared[ident] = (cls(**options), threading.Lock())
                    while len(self.shared) > SHARED_SAMPLERS:
                        self.shared.popitem(last=False)
                self.shared.move_to_end(ident)
                return self.shared[ident]
        except (ValueError, TypeError) as exc:
            raise field_error(["options"], str(exc)) from None

    def plan(self, req: SampleRequest, key: KeyConfig) -> tuple[Any, bool]:
        """Check everything a request can get wrong; return (work to run, inline?)."""
        cfg, lim = self.config, self.config.limits
        served = cfg.served_backends()
        if req.backend not in served:
            raise field_error(["backend"], f"unknown backend {req.backend!r}; this service "
                              f"serves {served}")
        if not key.may_use(req.backend):
            raise ServiceError(403, f"key {key.label()!r} may not use backend {req.backend!r}; "
                               f"it may use {[b for b in served if key.may_use(b)]}")
        ok, why = sampler_class(req.backend).availability()
        if not ok:
            raise ServiceError(503, f"backend {req.backend!r} is unavailable here: {why}",
                               {"Retry-After": "60"})
        n_vars, kind = problem_size(req), req.problem_field()
        n_couplings = problem_couplings(req)
        for what, value, limit in (("num_samples", req.num_samples, lim.max_num_samples),
                                   ("variables", n_vars, lim.max_variables),
                                   ("num_samples × variables", req.num_samples * n_vars,
                                    lim.max_result_values),
                                   (f"couplings of the {kind}", n_couplings or 0,
                                    lim.max_couplings)):
            if value > limit:
                raise ServiceError(413, f"{what} = {value} is over this service's limit of "
                                   f"{limit}; split the request")
        if req.clamp is not None:
            if req.bqm is not None:
                raise field_error(["clamp"], "clamp applies to `rbm` and `bm` problems; for a "
                                  "BQM fix the variables in the BQM itself (dimod's "
                                  "bqm.fix_variable) or send it as a `bm`")
            check_clamp_indices(req.clamp, n_vars, kind)
        policy = cfg.policy(req.backend)
        locked = sorted(set(req.options) & set(policy.locked))
        if locked:
            raise ServiceError(403, f"option(s) {locked} of backend {req.backend!r} are fixed by "
                               "the service and may not be set by clients")
        budgeted = sorted(set(req.options) & set(SERVICE_BUDGET_OPTIONS))
        qpu = sampler_class(req.backend).capabilities.resource == "qpu"
        if qpu and budgeted:
            raise ServiceError(403, f"option(s) {budgeted} of backend {req.backend!r} belong to "
                               "the service: its QPU budgets are the keys' qpu_budget_s and the "
                               "service's qpu_time_budget_s")
        try:  # names and values, once, by the backend's Options model (no import, no I/O)
            options = parse_options(req.backend, {**policy.options, **req.options})
        except OptionError as exc:
            name = exc.option or (exc.unknown[0] if len(exc.unknown) == 1 else None)
            raise field_error(["options", name] if name else ["options"], str(exc)) from None
        if req.backend == "dimod":  # `sampler` names code to import: only the allowlist's
            path = options.sampler
            if path not in cfg.dimod_samplers:
                raise ServiceError(403, f"sampler {path!r} of backend 'dimod' is not in this "
                                   f"service's dimod_samplers allowlist {cfg.dimod_samplers}")
        sampler, lock = self.sampler(req.backend, options)
        if req.rbm is not None:
            problem: Any = build_rbm(req.rbm)
        elif req.bm is not None:
            problem = build_bm(req.bm)
            classes = len(problem.colour_classes)
            if problem.n_edges and classes > 2 and not samples_any_graph(sampler):
                raise field_error(["bm"], f"this Boltzmann machine's graph needs "
                                  f"{classes} colour classes; backend "
                                  f"{req.backend!r} samples bipartite models only, use one of "
                                  f"{any_graph_backends()}")
        else:
            problem = build_bqm(req.bqm or {})
            if problem.num_interactions > lim.max_couplings:  # whatever its head list said
                raise ServiceError(413, f"couplings of the bqm = {problem.num_interactions} is "
                                   f"over this service's limit of {lim.max_couplings}; split "
                                   "the request")
            try:
                bipartition(problem)
            except NotBipartite as exc:
                if not samples_any_graph(sampler):
                    raise field_error(["bqm"], f"{exc}; backend {req.backend!r} samples "
                                      "bipartite models only, use one of "
                                      f"{any_graph_backends()} for a general BQM") from None
        self.check_work(req.backend, options, problem, req.num_samples)
        reservation: Reservation | None = None
        if qpu:
            # the request's whole QPU cost (calibration, read splits, spin-reversal transforms,
            # annealing_time) is held atomically against the key's and the service's budgets
            estimate = sampler.estimate_qpu_seconds(req.num_samples)  # type: ignore[attr-defined]
            reservation = self.ledger.reserve(key, estimate)
        inline = req.mode == "inline" or (req.mode == "auto" and
                                          req.num_samples * n_vars <= lim.inline_max_work)

        def work(job: Job) -> bytes:
            started = time.time()
            try:
                with lock:
                    if reservation is not None:  # checked before, charged after, each QPU call
                        sampler.meter = reservation  # type: ignore[attr-defined]
                    try:
                        if req.bqm is None:  # an RBM or a BM, clamped or not
                            out: Any = sampler.sample(problem, req.num_samples, seed=req.seed,
                                                      clamp=req.clamp)
                        else:
                            out = sample_bqm(sampler, problem, req.num_samples, seed=req.seed)
                    finally:
                        if reservation is not None:
                            sampler.meter = None  # type: ignore[attr-defined]
            except QPUBudgetExceeded as exc:  # spent by others since admission
                raise ServiceError(429, str(exc)) from None
            except (ValueError, TypeError, NotImplementedError) as exc:
                # e.g. exact on a too-large RBM, or a kernel that refuses this graph
                raise field_error([kind], f"backend {req.backend!r} refused the problem: "
                                  f"{exc}") from None
            qpu = float(out.info.get("qpu_access_time_s") or 0.0)
            if qpu:
                self.metrics.qpu_seconds.labels(key.label()).inc(qpu)
            served_by = str(out.info.get("served_by", req.backend))
            self.metrics.samples.labels(req.backend, served_by).inc(req.num_samples)
            if out.info.get("fallback"):
                self.metrics.fallbacks.labels(req.backend).inc()
            finished = time.time()
            extra = {"queue_wait_s": started - job.submitted_at,
                     "service_s": finished - job.submitted_at, "key": key.label(),
                     "started_at": started, "finished_at": finished}
            labels = jsonable(problem.variables) if req.bm is not None else None
            return encode(job.id, req.backend, out, extra, req.return_continuous, labels)

        work.reservation = reservation  # type: ignore[attr-defined]  # released by admit()
        return work, inline

    def check_work(self, backend: str, options: Any, problem: Any,
                   num_samples: int) -> None:
        """413 when the backend's work model prices the request over a limit, naming the
        options that drive it, their values and the limit (`options` already parsed)."""
        if isinstance(problem, (RBM, BoltzmannMachine)):
            shape = ProblemShape.of(problem)  # a clamp only makes the work smaller
        else:
            try:
                visible, hidden = bipartition(problem)
                shape = ProblemShape(len(visible), len(hidden), problem.num_interactions)
            except NotBipartite:
                shape = ProblemShape(problem.num_variables, 0, problem.num_interactions, False)
        lim = self.config.limits
        costs = sampler_class(backend).work(options, shape, num_samples)
        for quantity, cost in costs.items():
            field = WORK_LIMITS[quantity]
            limit = getattr(lim, field)
            if cost.value > limit:
                exc = ServiceError(413, f"backend {backend!r}: {quantity} = {cost.value:.4g} "
                                   f"[{cost.formula}] is over this service's limit "
                                   f"limits.{field} = {limit:.4g}; lower "
                                   f"{' or '.join(cost.options)}")
                exc.body = {"limit": field, "limit_value": limit,  # type: ignore[attr-defined]
                            "value": cost.value, "options": list(cost.options)}
                raise exc

    def admit(self, req: SampleRequest, key: KeyConfig, body_bytes: int,
              idempotency_key: str | None) -> Job:
        """Plan, hold the QPU budget and result space, and submit; the holds are released once
        the job is final. A retry of an admitted request gets its job back and holds nothing
        (a second hold could refuse the very request whose first attempt is paid for)."""
        if idempotency_key is not None:
            known = self.scheduler.find(key.label(), idempotency_key)
            if known is not None:
                return known
        work, inline = self.plan(req, key)
        # the one shared QPU, or the CPU workers (a servable backend runs in this process)
        qpu = sampler_class(req.backend).capabilities.resource == "qpu"
        resource = "qpu" if qpu else "cpu"
        reservation: Reservation | None = getattr(work, "reservation", None)
        held = 0

        def release(_: Any = None) -> None:  # once the job is final (or never admitted)
            if reservation is not None:
                reservation.release()
            if held:
                self.release_result_space(held)

        try:
            if not inline:
                held = self.reserve_result_space(req, body_bytes)
            job = self.scheduler.submit(key.label(), req.backend, resource, work,
                                        inline=inline, idempotency_key=idempotency_key)
        except BaseException:
            release()
            raise
        job.done.add_done_callback(release)
        return job

    def backends_for(self, key: KeyConfig) -> BackendList:
        out, status = {}, backends.registry.availability()
        for name in self.config.served_backends():
            ok, why = status[name]
            cls = sampler_class(name)
            out[name] = BackendInfo(available=ok, reason=why, allowed=key.may_use(name),
                                    binary=cls.capabilities.binary,
                                    resource=cls.capabilities.resource,
                                    general_bqm=cls.capabilities.general_bqm,
                                    any_graph=samples_any_graph(cls),
                                    options=option_names(name),
                                    locked_options=self.config.policy(name).locked)
        return BackendList(backends=out)


def parse_sample_request(raw: bytes) -> SampleRequest:
    """Validate the body straight from bytes: pydantic's JSON parser is ~6× faster than
    FastAPI's json.loads-then-validate on a 100×100 RBM (0.5 ms against 3.2 ms)."""
    try:
        return SampleRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def error_response(exc: ServiceError) -> JSONResponse:
    body = {"detail": exc.detail, **getattr(exc, "body", {})}  # e.g. the QPU budget's figures
    return JSONResponse(body, exc.status_code, headers=exc.headers)


def job_response(job: Job) -> Response:
    if job.status == "done" and job.result is not None:
        return Response(job.result, 200, media_type="application/json")
    error = job.error or {"status_code": 500, "detail": "the job ended without a result"}
    return JSONResponse({"detail": error["detail"]}, error["status_code"],
                        headers={"Retry-After": "5"} if error["status_code"] == 503 else None)


def create_app(config: ServiceConfig) -> FastAPI:
    """The FastAPI app for `config` (run it with uvicorn, or `qvae serve`)."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(5.0, config.job_ttl_s / 4))
                await asyncio.to_thread(service.scheduler.expire)

        sweeper = asyncio.create_task(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(service.scheduler.drain, config.shutdown_grace_s)

    app = FastAPI(title="qvae sampler service", version="1", lifespan=lifespan,
                  description="Samples of RBMs, Boltzmann machines on any graph and Ising/QUBO "
                  "models from every qvae backend "
                  "(QPU, simulated annealing, Gibbs, Langevin/MALA) behind one API.")
    app.state.service = service
    app.add_middleware(Guard, max_body_bytes=config.limits.max_body_bytes,
                       metrics=service.metrics, body_timeout_s=config.limits.body_timeout_s)

    async def on_service_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc)

    async def on_invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # FastAPI's default echoes each bad input back: a NaN breaks the JSON, a big body floods
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"],
                   **({"ctx": jsonable(e["ctx"])} if "ctx" in e else {})} for e in exc.errors()]
        return JSONResponse({"detail": errors}, 422)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    bearer = HTTPBearer(auto_error=False, description="an API key of this service")

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
               ) -> KeyConfig:
        return service.caller(creds)

    Caller = Annotated[KeyConfig, Depends(caller)]

    body_schema = {"$ref": "#/components/schemas/SampleRequest"}

    @app.post("/v1/sample", response_model=None, summary="draw samples",
              responses={200: {"model": SampleResult}, 202: {"model": JobAccepted}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": body_schema}}}})
    async def sample(request: Request, key: Caller,
                     idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
                     ) -> Response:
        """Sample an RBM (`rbm`), a Boltzmann machine (`bm`) or a dimod BQM (`bqm`) with
        `backend`, optionally with units clamped (`clamp`); small requests are answered inline,
        large ones (or `mode: job`) return a job id to poll."""
        raw = await request.body()
        req = parse_sample_request(raw)
        request.state.backend = req.backend
        # in a thread: a hold is a database transaction, which may wait on another writer
        job = await asyncio.to_thread(service.admit, req, key, len(raw), idempotency_key)
        if not job.inline:
            location = f"/v1/jobs/{job.id}"
            body = JobAccepted(job_id=job.id, status=job.status, location=location)
            return JSONResponse(body.model_dump(), 202, headers={"Location": location})
        await asyncio.wrap_future(job.done)
        service.scheduler.deliver(job)
        return job_response(job)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus SampleRequest, which /v1/sample parses itself (see above)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            body = SampleRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update({**body.pop("$defs", {}), "SampleRequest": body})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus,
             responses={404: {"model": ERRORS[401]["model"]}, 410: {"model": ERRORS[401]["model"]},
                        401: ERRORS[401]})
    async def job_status(job_id: str, key: Caller) -> Response:
        """A job's state; a finished job's result (or error) is delivered once, then 410."""
        job = service.scheduler.fetch(job_id, key.label())
        # the result is read from the database, off the event loop (it may be large)
        body, final = await asyncio.to_thread(service.scheduler.status_body, job)
        if final:
            await asyncio.to_thread(service.scheduler.deliver, job)
        return Response(body, 200, media_type="application/json")

    @app.get("/v1/backends", response_model=BackendList, responses={401: ERRORS[401]})
    async def list_backends(key: Caller) -> BackendList:
        """Backends this service serves, whether they run here (and why not), and options."""
        return service.backends_for(key)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    async def healthz() -> Response:
        """Liveness and load, without a key; 503 while shutting down."""
        queued, running = service.scheduler.counts()
        status = "draining" if service.scheduler.draining else "ok"
        body = Health(status=status, queued=queued, running=running).model_dump()
        return JSONResponse(body, 503 if status == "draining" else 200)

    @app.get("/metrics", response_class=Response, responses={401: ERRORS[401]})
    async def metrics(request: Request) -> Response:
        """Prometheus text: requests, latencies, queue depth, QPU seconds per key. Public unless
        the config sets metrics_public: false (then it needs a key like the API)."""
        if not config.metrics_public:  # read by hand: the schema must not demand a key here
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            ok = scheme.lower() == "bearer" and token
            service.caller(HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
                           if ok else None)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
