"""Experiment configuration: pydantic v2 models loaded from YAML, every key documented.

Unknown keys, wrong types and out-of-range values fail here, before any data is loaded or any
sampler is called. `--set section.key=value` overrides are parsed as YAML scalars.

>>> cfg = load_config("configs/smoke.yaml", overrides=["train.steps=5"])
>>> cfg.train.steps
5
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    # allow_inf_nan=False: no float key has a use for NaN or ±inf (`--set train.lr_final=.inf`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Smallest relaxation temperature: below it σ(x/τ) is a hard step in float32 and the
#: gradients, ∝ 1/τ, swamp the rest (at 1e-300 they are inf, then NaN).
MIN_TAU = 1e-3


class DataConfig(Strict):
    dataset: str = Field("mnist", description="'mnist' (shipped), 'mnist-labelled' (the "
                         "shipped MNIST test images with one-hot labels, for model.conditional) "
                         "or a path to .npy/.npz/dir")
    batch_size: int = Field(100, ge=1, le=100_000, description="training minibatch size")
    eval_batch_size: int = Field(100, ge=1, description="batch size for evaluation")


class PriorConfig(Strict):
    """The prior's graph over the latent units z (model.n_visible + model.n_hidden of them):
    `rbm`, the bipartite default (model.n_visible × model.n_hidden), or a Boltzmann machine on
    another graph (`qvae.boltzmann_graphs`): `multipartite` (k parts, couplers only between
    parts) or `qpu_native` (partitions of a QPU's own qubits and couplers)."""

    kind: Literal["rbm", "multipartite", "qpu_native"] = Field(
        "rbm", description="rbm (bipartite n_visible × n_hidden), multipartite or qpu_native"
    )
    sizes: list[int] | None = Field(
        None, description="multipartite: the part sizes, summing to the latent units "
        "(n_visible + n_hidden); or give model.prior.parts"
    )
    parts: int | None = Field(
        None, ge=2, le=64, description="multipartite: this many equal parts (must divide the "
        "latent units); exclusive with sizes"
    )
    density: float = Field(1.0, gt=0, le=1, description="multipartite: fraction of the "
                           "inter-part couplers kept (1: complete k-partite)")
    init_scale: float = Field(0.01, ge=0, le=10, description="multipartite/qpu_native: "
                              "initial coupling std")
    graph: Literal["topology", "backend"] = Field(
        "topology", description="qpu_native: the hardware graph: 'topology' "
        "(dwave.graphs' topology × shape, no QPU needed) or 'backend' (the dwave backend's "
        "solver graph: the QPU's, or its emulator's topology)"
    )
    topology: Literal["chimera", "pegasus", "zephyr"] | None = Field(
        None, description="qpu_native with graph=topology: chimera, pegasus or zephyr"
    )
    shape: int | list[int] | None = Field(
        None, description="qpu_native with graph=topology: the topology's size, e.g. 6 "
        "(Pegasus P6) or [4, 4, 4] (Chimera)"
    )
    partitions: int = Field(4, ge=2, le=64, description="qpu_native: partitions of the qubits "
                            "(they must divide the latent units: that many qubits each)")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is not None and (len(sizes) < 2 or any(s < 1 for s in sizes)):
            raise ValueError(f"sizes must list at least two part sizes >= 1, got {sizes}")
        return sizes

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: int | list[int] | None) -> int | list[int] | None:
        dims = [shape] if isinstance(shape, int) else shape
        if dims is not None and (not dims or any(d < 1 or d > 64 for d in dims)):
            raise ValueError(f"shape must be an int or a list of ints in 1..64, got {shape}")
        return shape

    def check_units(self, n_latent: int) -> None:
        """ValueError naming the field when this prior does not cover `n_latent` units."""
        fields = {"multipartite": ("sizes", "parts", "density"),
                  "qpu_native": ("graph", "topology", "shape", "partitions")}
        stray = [f"model.prior.{key}" for kind, keys in fields.items() if kind != self.kind
                 for key in keys if getattr(self, key) != type(self).model_fields[key].default]
        # (compared with the defaults, not `model_fields_set`: a saved config sets every key)
        if stray:
            raise ValueError(f"{stray} do not apply to model.prior.kind={self.kind!r}; "
                             "remove them")
        if self.kind == "multipartite":
            if (self.sizes is None) == (self.parts is None):
                raise ValueError("model.prior.kind=multipartite needs one of model.prior.sizes "
                                 "(e.g. [50, 50, 50, 50]) and model.prior.parts (e.g. 4)")
            if self.sizes is not None and sum(self.sizes) != n_latent:
                raise ValueError(f"model.prior.sizes {self.sizes} sum to {sum(self.sizes)}, "
                                 f"not the {n_latent} latent units (model.n_visible + "
                                 "model.n_hidden)")
            if self.parts is not None and n_latent % self.parts:
                raise ValueError(f"model.prior.parts={self.parts} must divide the {n_latent} "
                                 "latent units (model.n_visible + model.n_hidden)")
        if self.kind == "qpu_native":
            if n_latent % self.partitions:
                raise ValueError(f"model.prior.partitions={self.partitions} must divide the "
                                 f"{n_latent} latent units (model.n_visible + model.n_hidden)")
            if self.graph == "topology" and (self.topology is None or self.shape is None):
                raise ValueError("model.prior.kind=qpu_native with graph=topology needs "
                                 "model.prior.topology and model.prior.shape (e.g. pegasus, 6)")
            if self.graph == "backend" and (self.topology is not None or self.shape is not None):
                raise ValueError("model.prior.graph=backend takes the dwave backend's solver "
                                 "graph: set its topology with backend.options.topology / "
                                 "topology_shape, not model.prior.topology / shape")


class ConditionalConfig(Strict):
    """Class-conditional mode: label units of the prior set from each example's label."""

    label_units: int = Field(
        0, ge=0, le=1024, description="one-hot label units: the first label_units latent "
        "units, set to each example's label (the data's last label_units columns) instead of "
        "inferred (0: off)"
    )


class ModelConfig(Strict):
    kind: Literal["dvae", "sde"] = Field(
        "dvae", description="dvae (RBM prior on z=[v,h]) or sde (Langevin prior path, Girsanov)"
    )
    n_visible: int = Field(100, ge=1, le=4096, description="RBM visible units (latent part 1)")
    n_hidden: int = Field(100, ge=1, le=4096, description="RBM hidden units (latent part 2)")
    encoder_hidden: list[int] = Field([200, 200], description="encoder MLP hidden widths")
    decoder_hidden: list[int] = Field([200, 200], description="decoder MLP hidden widths")
    activation: Literal["tanh", "relu", "elu", "leaky_relu"] = Field(
        "tanh", description="MLP nonlinearity: tanh, relu, elu, leaky_relu"
    )
    rbm_init_std: float = Field(0.01, ge=0, le=10, description="initial RBM coupling std")
    control_hidden: list[int] = Field([200], description="sde: control network hidden widths")
    sde_steps: int = Field(20, ge=1, le=10_000, description="sde: Euler–Maruyama steps")
    sde_horizon: float = Field(1.0, ge=1e-3, le=1000, description="sde: time horizon T")
    groups: int = Field(
        1, ge=1, le=64, description="dvae: latent groups of the hierarchical posterior "
        "q(z|x) = Π_g q(z_g|x, z_<g); must divide n_visible + n_hidden (1: factorial)"
    )
    batch_norm: bool = Field(False, description="dvae: batch norm after each hidden layer")
    relaxation: Literal["gumbolt", "power"] = Field(
        "gumbolt", description="dvae: how training relaxes z: gumbolt (ζ = σ((α+L)/τ), τ from "
        "train.tau_start/tau_end) or power (DVAE#'s power-function overlap, sharpness "
        "model.power_beta; τ unused)"
    )
    power_beta: float = Field(
        40.0, ge=1, le=1000, description="dvae, relaxation=power: β of the smoothing "
        "r(ζ|0) ∝ ζ^(1/β-1) (the DVAE# code: 20-40 on MNIST; larger is closer to binary)"
    )
    prior: PriorConfig = Field(default_factory=PriorConfig)
    conditional: ConditionalConfig = Field(default_factory=ConditionalConfig)

    @field_validator("encoder_hidden", "decoder_hidden", "control_hidden")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError(f"layer widths must be >= 1, got {widths}")
        return widths

    @model_validator(mode="after")
    def _groups_fit(self) -> ModelConfig:
        n = self.n_visible + self.n_hidden
        if n % self.groups:
            raise ValueError(
                f"model.groups={self.groups} must divide the {n} latent units "
                "(model.n_visible + model.n_hidden)"
            )
        if self.kind == "sde" and (self.groups != 1 or self.batch_norm
                                   or self.relaxation != "gumbolt"):
            raise ValueError("model.groups, model.batch_norm and model.relaxation apply to "
                             "kind=dvae only")
        if self.relaxation == "power" and self.conditional.label_units:
            raise ValueError("model.relaxation=power relaxes every latent unit, and the label "
                             "units are observed: use model.relaxation=gumbolt with "
                             "model.conditional.label_units")
        if self.kind == "sde" and (self.prior.kind != "rbm" or self.conditional.label_units):
            raise ValueError("model.prior.kind other than rbm and model.conditional apply to "
                             "kind=dvae only (the SDE-VAE's prior path relaxes an RBM)")
        self.prior.check_units(n)
        if self.conditional.label_units >= n:
            raise ValueError(f"model.conditional.label_units={self.conditional.label_units} "
                             f"must be below the {n} latent units (the label units are "
                             "the first of them)")
        return self


class BackendConfig(Strict):
    name: str = Field("gibbs", description="sampler backend for the negative phase")
    num_samples: int = Field(100, ge=1, le=1_000_000, description="negative samples per step")
    options: dict[str, Any] = Field(
        default_factory=dict, description="backend options (remote: the target's options)"
    )
    url: str | None = Field(
        None, description="remote: service base URL, e.g. http://127.0.0.1:8700 "
        "(None: $QVAE_SERVICE_URL)"
    )
    target: str | None = Field(
        None, description="remote: backend the service samples with, e.g. dwave"
    )
    remote: dict[str, Any] = Field(
        default_factory=dict,
        description="remote: client settings: timeout_s, max_retries, retry_backoff_s, mode, ... "
        "(api_key too, but prefer $QVAE_API_KEY: the config is saved with every run)",
    )

    @model_validator(mode="after")
    def _known_backend_and_options(self) -> BackendConfig:
        """Names and values checked by the backend's own `Options` model (remote: the client's
        by its model, the target's by the target's), so a bad value fails here, before any
        data is loaded, naming its config field."""
        from backends.options import OptionError
        from backends.registry import parse_options, registered

        if self.name not in registered():
            raise ValueError(f"unknown backend {self.name!r}; choose one of {registered()}")
        if not is_client(self.name):
            stray = [f"backend.{key}" for key in CLIENT_FIELDS if getattr(self, key)]
            if stray:
                raise ValueError(
                    f"{stray} only apply to backend 'remote' (backend.name is {self.name!r}); "
                    "remove them or set backend.name=remote"
                )
        else:
            if self.target is None:
                raise ValueError(
                    "backend 'remote' needs backend.target, the backend the service samples "
                    "with: e.g. --set backend.target=dwave"
                )
            clash = sorted(set(self.remote) & set(FROM_CONFIG))
            if clash:
                raise ValueError(f"unknown key(s) {clash} in backend.remote: set them as "
                                 f"{[f'backend.{key}' for key in clash]}")
        name, options = sampler_options(self)
        try:
            parse_options(name, options)
        except OptionError as exc:
            raise PydanticCustomError("backend_option", "{message}",
                                      {"message": str(exc), "field": self._field(exc)}) from None
        return self

    def _field(self, exc: Any) -> str:
        """The config key an `OptionError` of `sampler_options(self)` is about."""
        option = exc.option
        if exc.backend != self.name or not is_client(self.name):  # the sampling backend's
            return "backend.options" + (f".{option}" if option else "")
        if option in ("url", "target", "options"):
            return f"backend.{option}"
        return "backend.remote" + (f".{option}" if option else "")


#: BackendConfig fields that only a client of a sampler service (backend 'remote') reads.
CLIENT_FIELDS = ("url", "target", "remote")
#: The client's options that BackendConfig fills from its own fields, not from backend.remote.
FROM_CONFIG = ("url", "target", "options")


def is_client(name: str) -> bool:
    """Whether backend `name` samples on another service (`capabilities.resource` network),
    reading backend.url, backend.target and backend.remote."""
    from backends.registry import sampler_class

    try:
        return sampler_class(name).capabilities.resource == "network"
    except (ImportError, ValueError):  # unknown or unloadable: reported where it is used
        return False


def sampler_options(backend: BackendConfig) -> tuple[str, dict[str, Any]]:
    """(name, kwargs) for `backends.get_sampler` from a backend section.

    >>> sampler_options(BackendConfig(name="gibbs", options={"num_sweeps": 5}))
    ('gibbs', {'num_sweeps': 5})
    """
    if not is_client(backend.name):
        return backend.name, dict(backend.options)
    return backend.name, {"url": backend.url, "target": backend.target,
                          "options": dict(backend.options), **backend.remote}


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    lr: float = Field(3e-3, gt=0, le=1, description="Adam learning rate")
    lr_schedule: Literal["constant", "cosine", "exponential", "piecewise"] = Field(
        "cosine", description="lr from train.lr to train.lr_final: constant, cosine, "
        "exponential; piecewise: the DVAE reference's lr/10 to 2 %, lr to 60 %, lr/3 to 75 %, "
        "lr/10 to 95 %, lr/33 after (lr_final unused)"
    )
    lr_final: float = Field(1e-4, ge=0, le=1, description="learning rate at the last step")
    adam_eps: float = Field(1e-8, ge=1e-12, le=1, description="Adam ε (the DVAE reference: 1e-3)")
    weight_decay: float = Field(
        0.0, ge=0, le=1, description="coefficient of ½Σw² over network weights, batch-norm "
        "scales and the RBM couplings, added to the loss (the DVAE reference: 1e-4)"
    )
    kl_warmup_steps: int = Field(0, ge=0, description="steps over which the KL weight rises 0→1")
    kl_warmup_fraction: float = Field(
        0.0, ge=0, le=1, description="KL warm-up as a fraction of train.steps (the DVAE "
        "reference: 0.3); exclusive with kl_warmup_steps"
    )
    tau_start: float = Field(1.0, ge=MIN_TAU, le=10,
                             description="relaxation temperature at step 0")
    tau_end: float = Field(0.25, ge=MIN_TAU, le=10,
                           description="relaxation temperature at the end")
    num_iw: int = Field(1, ge=1, le=1000, description="importance samples in the training bound")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm (None: off)")
    log_every: int = Field(50, ge=1, description="steps between metric rows")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    sample_grid: int = Field(64, ge=0, le=1024, description="prior samples decoded at the end")
    validate_every: int = Field(
        0, ge=0, description="steps between validation NLL estimates; the best so far is kept "
        "as best.pt beside last.pt and evaluated at the end (0: off)"
    )
    validate_examples: int | None = Field(
        1000, ge=1, description="validation examples used (None: the whole split)"
    )
    validate_num_iw: int = Field(100, ge=1, le=5000, description="K of the validation NLL")
    validate_ais_betas: int = Field(
        1000, ge=10, le=1_000_000, description="AIS temperatures of the validation log Z "
        "(exact when the smaller RBM layer has <= eval.exact_limit_units units)"
    )
    validate_ais_runs: int = Field(100, ge=2, le=100_000, description="AIS runs, validation")

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.kl_warmup_steps and self.kl_warmup_fraction:
            raise ValueError(
                "set one of train.kl_warmup_steps and train.kl_warmup_fraction, not both"
            )
        return self


class EvalConfig(Strict):
    at_end: bool = Field(True, description="evaluate the test set when training ends")
    split: Literal["valid", "test"] = Field("test", description="split evaluated: valid, test")
    num_iw: int = Field(1000, ge=1, le=5000, description="K of the importance-weighted NLL")
    max_examples: int | None = Field(
        None, ge=1, description="evaluate on N examples drawn at random (seed 0, the same N in "
        "every run; the MNIST test split is sorted by label, so not the first N)")
    logz: Literal["auto", "exact", "ais", "pt"] = Field(
        "auto", description="log Z: exact, ais, pt (replica exchange), or auto "
        "(exact when the smaller layer is small, else AIS, else pt where AIS is provably low)"
    )
    exact_limit_units: int = Field(20, ge=1, le=24, description="auto: exact up to this layer")
    ais_betas: int = Field(10000, ge=10, description="AIS intermediate temperatures")
    ais_runs: int = Field(100, ge=2, description="AIS independent runs")
    pt_replicas: int = Field(200, ge=3, le=2000, description="pt: temperatures from 1 to 0")
    pt_chains: int = Field(100, ge=10, le=10_000, multiple_of=10, description="pt: chains "
                           "per temperature (10 groups give the spread)")
    pt_burn_in: int = Field(1000, ge=0, le=1_000_000, description="pt: sweeps before measuring")
    pt_sweeps: int = Field(2000, ge=2, le=1_000_000, description="pt: sweeps measured")


class Config(Strict):
    """The full experiment; saved verbatim in every checkpoint."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="run name")
    seed: int = Field(0, ge=0, description="seed for data order, init and samplers")
    device: str = Field("cpu", description="'cpu' or 'cuda'")
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch CPU threads for train/evaluate (--threads N); "
        "None: chosen from the work's size, 1 for the shipped training configs (qvae.threads)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _prior_graph_source(self) -> Config:
        if self.model.conditional.label_units and self.data.dataset.lower() == "mnist":
            raise ValueError("model.conditional needs labelled data: the shipped 'mnist' has no "
                             "labels; use data.dataset=mnist-labelled (or your own rows with "
                             "one-hot label columns appended)")
        if self.data.dataset.lower() == "mnist-labelled" and not self.model.conditional.label_units:
            raise ValueError("data.dataset=mnist-labelled rows end in 10 one-hot label columns: "
                             "set model.conditional.label_units=10 (or use data.dataset=mnist)")
        prior = self.model.prior
        n_parts = (len(prior.sizes) if prior.sizes else prior.parts or 0
                   ) if prior.kind == "multipartite" else (
                       prior.partitions if prior.kind == "qpu_native" else 2)
        if n_parts > 2:
            from backends.registry import sampler_class

            name = _sampling_backend(self.backend.model_dump())
            if not sampler_class(name).capabilities.any_graph:
                raise ValueError(f"backend {name!r} samples RBMs and bipartite priors only, and "
                                 f"model.prior.kind={prior.kind} has {n_parts} parts: use "
                                 "backend gibbs, neal, exact or dwave, or a 2-part prior")
        if prior.kind == "qpu_native" and prior.graph == "backend" and (
                _sampling_backend(self.backend.model_dump()) != "dwave"):
            raise ValueError("model.prior.graph=backend takes the dwave backend's solver graph, "
                             f"but backend.name is {self.backend.name!r}: use backend dwave "
                             "(its emulator needs no QPU) or model.prior.graph=topology")
        if self.eval.logz == "pt" and self.model.kind != "dvae":
            raise ValueError("eval.logz=pt estimates log Z of a dvae model's Boltzmann prior, "
                             f"not of model.kind={self.model.kind}: use eval.logz ais or auto")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        return device


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings (values parsed as YAML: 3, 0.1, true, [1,2], text)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML; quote it or fix "
                              "the brackets") from None
        _set_dotted(raw, key.strip(), parsed)
    return raw


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # a backend option's error names its own key (backend.options.num_sweeps), found by
        # the backend's Options model below the section it was raised for
        where = (e.get("ctx") or {}).get("field") or ".".join(str(p) for p in e["loc"]) \
            or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        elif e["type"] in _RANGE_ERRORS:
            allowed = _allowed_range(e["loc"])
            msg = f"{msg}, got {e.get('input')!r}" + (f" (allowed: {allowed})" if allowed else "")
        lines.append(f"  {where}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "finite_number")


def _allowed_range(loc: tuple[Any, ...]) -> str | None:
    """'0.001 <= x <= 10' for the numeric field at `loc` of Config, from its Field bounds."""
    model: Any = Config
    info = None
    for key in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(key, str) or not fields or key not in fields:
            return None
        info = fields[key]
        model = info.annotation
    if info is None:
        return None
    low = high = ""
    for m in info.metadata:
        for attr, sign in (("ge", "<="), ("gt", "<")):
            if getattr(m, attr, None) is not None:
                low = f"{getattr(m, attr)} {sign} "
        for attr, sign in (("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                high = f" {sign} {getattr(m, attr)}"
    return f"{low}{loc[-1]}{high}, finite" if low or high else "a finite number"


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def read_yaml(path: str | Path | None, what: str = "config") -> dict[str, Any]:
    """The mapping in a YAML file ({} when path is None); ConfigError when missing or not one.

    `path` may also name a shipped config (`quickstart`, `paper/1-layer-lin`): see
    `qvae.configs_path`.
    """
    from qvae.configs_path import resolve_config_path

    if path is None:
        return {}
    try:
        path = resolve_config_path(path, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}{where}: {problem}; fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None,
    *, backend: str | None = None, notes: list[str] | None = None,
) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, validate.

    `backend` is `--backend`: see `switch_backend` (its notes are appended to `notes`).
    """
    return validate_config(switched(read_yaml(path), list(overrides or []), backend, notes))


def switched(
    raw: dict[str, Any], overrides: list[str], backend: str | None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """`raw` with `--backend` and then the `--set` overrides applied (see `switch_backend`)."""
    if backend is not None:
        found = switch_backend(raw, backend, overrides)
        if notes is not None:
            notes.extend(found)
    return apply_overrides(raw, overrides)


def _sampling_backend(section: dict[str, Any]) -> str:
    """The backend that reads backend.options: the name, or remote's target."""
    name = section.get("name", "gibbs")
    return section.get("target") or name if is_client(name) else name


def switch_backend(raw: dict[str, Any], name: str, overrides: list[str]) -> list[str]:
    """Set backend.name=`name` in `raw` (in place), dropping what belongs to the file's backend.

    backend.options belong to the backend that reads them (the name, or remote's target): when
    `--backend` (plus any `--set backend.target=...`) samples with a different one, the file's
    options are dropped and so are remote-only keys a non-remote backend refuses. Options given
    with `--set backend.options.KEY=VALUE` are applied afterwards and always kept. Returns one
    note per dropped group, for the CLI to print.
    """
    section = raw.get("backend")
    if not isinstance(section, dict):
        section = raw["backend"] = {}
    before = _sampling_backend(section)
    probe = apply_overrides(copy.deepcopy({**raw, "backend": {**section, "name": name}}),
                            overrides)
    after = _sampling_backend(probe.get("backend") or {})
    section["name"] = name
    notes = []
    if after != before and section.get("options"):
        dropped = section.pop("options")
        notes.append(
            f"--backend {name}: dropped the file's backend.options {dropped} (they are "
            f"{before}'s); set {after}'s with --set backend.options.KEY=VALUE "
            f"(`qvae backends` lists them)"
        )
    if not is_client(name):
        stray = [key for key in CLIENT_FIELDS if section.get(key)]
        for key in stray:
            section.pop(key)
        if stray:
            notes.append(f"--backend {name}: dropped the file's backend.{'/'.join(stray)} "
                         "(only backend 'remote' reads them)")
    return notes


def describe() -> str:
    """Every config key with its type, default and description (for --help and the README)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for key, f in model.model_fields.items():
            sub = f.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):  # a subsection
                walk(sub, f"{prefix}{key}.")
                continue
            default = f.default if f.default_factory is None else f.default_factory()
            lines.append(f"{prefix}{key} = {default!r}  {f.description or ''}".rstrip())

    walk(Config, "")
    return "\n".join(lines)
