"""Declared backend options and capabilities: what a backend accepts, checked in one place.

Each backend declares a pydantic `Options` model (names, types, defaults, ranges, a description
per option) and a `Capabilities` record. The registry, the run config, the sampler service, the
Ocean adapter and the README's option tables all read these declarations; a value is checked
once, by the model, where it enters (a config file, a request, a constructor call).

>>> class CoinOptions(BackendOptions):
...     flips: int = Field(10, ge=1, le=10**6, description="flips per sample")
>>> parse_options(CoinOptions, {"flips": 3}, backend="coin").flips
3
>>> try:
...     parse_options(CoinOptions, {"flips": 0}, backend="coin")
... except OptionError as exc:
...     print(exc)
backend 'coin' option flips must be greater than or equal to 1, got 0 (flips: flips per sample)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["BackendOptions", "Capabilities", "Field", "OptionError", "parse_options",
           "option_table"]


class OptionError(ValueError):
    """A backend option with an unknown name or a bad value; the message is one line.

    `backend`, `option` (the bad option, None when names are unknown) and `unknown` (the
    unknown names) let a caller name its own field, e.g. a config's `backend.options.KEY`.
    """

    def __init__(self, message: str, *, backend: str = "", option: str | None = None,
                 unknown: list[str] | None = None) -> None:
        super().__init__(message)
        self.backend, self.option, self.unknown = backend, option, list(unknown or [])


class BackendOptions(BaseModel):
    """Base of every backend's options: strict types (no bool for an int, no string for a
    number), finite numbers, unknown names refused, immutable once checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              arbitrary_types_allowed=True)


@dataclass(frozen=True)
class Capabilities:
    """What a backend is, for the code that chooses and schedules backends.

    resource: what a call consumes: "cpu" (this process), "qpu" (the one shared annealer: a
        service serves such calls one at a time and charges them to QPU budgets), "network"
        (another service does the work).
    output: "binary" ({0,1} samples of the RBM) or "continuous" (a relaxation, rounded for
        `visible`/`hidden`, with the continuous state in `SampleSet.continuous`).
    servable: a sampler service may offer it (False for a client of another service).
    general_bqm: it also samples any dimod BQM (`sample_general_bqm`), not only RBMs.
    any_graph: it samples a `BoltzmannMachine` on any graph (its own `_sample_bm` kernel, or
        through `sample_general_bqm`); otherwise only RBMs and bipartite models, and a
        non-bipartite one gets a clear NotImplementedError.
    """

    resource: Literal["cpu", "qpu", "network"] = "cpu"
    output: Literal["binary", "continuous"] = "binary"
    servable: bool = True
    general_bqm: bool = False
    any_graph: bool = False

    def __post_init__(self) -> None:
        if self.general_bqm and not self.any_graph:  # a general BQM covers any graph
            object.__setattr__(self, "any_graph", True)

    @property
    def binary(self) -> bool:
        return self.output == "binary"


def _describe(error: dict[str, Any]) -> str:
    msg = error["msg"]
    for old, new in (("Input should be", "must be"), ("Value error, ", ""),
                     ("Assertion failed, ", "")):
        msg = msg.replace(old, new)
    return msg


def parse_options(model: type[BackendOptions], given: Mapping[str, Any] | BackendOptions,
                  *, backend: str) -> BackendOptions:
    """`given` checked against `model`; an `OptionError` naming the option, its value and what
    it must be otherwise. An instance of `model` is returned as it is (already checked)."""
    if isinstance(given, model):
        return given
    if isinstance(given, BaseModel):
        given = dict(given)
    if not isinstance(given, Mapping):
        raise OptionError(f"options for backend {backend!r} must be a mapping of option names "
                          f"to values, got {type(given).__name__}", backend=backend)
    valid = list(model.model_fields)
    unknown = sorted(str(k) for k in given if k not in model.model_fields)
    if unknown:
        raise OptionError(f"unknown option(s) {unknown} for backend {backend!r}; "
                          f"valid options: {valid}", backend=backend, unknown=unknown)
    try:
        return model.model_validate(dict(given))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in err["loc"]) or "(options)"
        top = err["loc"][0] if err["loc"] else None
        value = given.get(top, err.get("input")) if top is not None else err.get("input")
        field = model.model_fields.get(top) if isinstance(top, str) else None
        about = f" ({top}: {field.description})" if field and field.description else ""
        # a secret (an API key) is never echoed, not even a mistyped one (a blank one may be)
        extra = field.json_schema_extra if field is not None else None
        secret = isinstance(extra, dict) and extra.get("secret")
        blank = isinstance(value, str) and not value.strip()
        shown = f"a {type(value).__name__}" if secret and not blank else repr(value)
        raise OptionError(f"backend {backend!r} option {name} {_describe(err)}, "
                          f"got {shown}{about}", backend=backend,
                          option=top if isinstance(top, str) else None) from None


def option_table(model: type[BackendOptions]) -> str:
    """A markdown table of `model`'s options: name, default, description (README, --help)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        default = ("required" if field.is_required()
                   else f"`{field.get_default(call_default_factory=True)!r}`")
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {default} | {text} |")
    return "\n".join(rows)
