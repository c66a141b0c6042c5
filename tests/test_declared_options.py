"""Declared options (issue 12 item 1): every backend's options are one pydantic model, read by
the registry, the run config, the service and the README, and checked once where they enter;
third-party backends register through the `qvae.backends` entry-point group."""

import textwrap

import pytest

import backends
from backends import docs, registry
from backends.options import BackendOptions, OptionError
from backends.testing import random_rbm, run_conformance
from qvae.cli import main as cli_main
from qvae.config import ConfigError, load_config
from qvae.service.app import OPEN_KEY, Service
from qvae.service.jobs import ServiceError
from qvae.service.schemas import SampleRequest
from qvae.service.settings import ServiceConfig, load_service_config

BUILTIN = list(registry._BUILTIN)

# A real (if small) third-party backend: exact sampling by enumerating all joint states.
PLUGIN = '''
import torch

from backends.base import Sampler, SampleSet, energies, make_generator
from backends.options import BackendOptions, Capabilities, Field


class BruteOptions(BackendOptions):
    max_units: int = Field(16, ge=2, le=20, description="most units (visible + hidden) it "
                           "enumerates jointly, 2^max_units states")
    beta: float = Field(1.0, gt=0, description="inverse temperature of the samples")


class BruteSampler(Sampler):
    name = "brute"
    Options = BruteOptions
    capabilities = Capabilities(resource="cpu", output="binary")

    def _sample(self, rbm, num_samples, *, seed, timer):
        n, nv = rbm.n_units, rbm.n_visible
        if n > self.options.max_units:
            raise ValueError(f"{n} units is over max_units={self.options.max_units}")
        with timer("preprocess"):
            states = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).double()
            model = rbm.float64_copy().cpu()
            logits = -self.options.beta * model.energy(states[:, :nv], states[:, nv:])
        with timer("sample"):
            pick = torch.multinomial(torch.softmax(logits, 0), num_samples, replacement=True,
                                     generator=make_generator(seed))
        with timer("postprocess"):
            z = states[pick].to(rbm.weight.device, rbm.weight.dtype)
            v, h = z[:, :nv], z[:, nv:]
            return SampleSet(v, h, energies(rbm, v, h), {"states": 2**n})
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A package installed in `tmp_path` (a dist-info importlib.metadata reads) declaring two
    `qvae.backends` entry points: `brute`, which works, and `broken`, whose module is missing."""
    (tmp_path / "qvae_brute_plugin.py").write_text(PLUGIN)
    info = tmp_path / "qvae_brute_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qvae-brute-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [qvae.backends]
        brute = qvae_brute_plugin:BruteSampler
        broken = qvae_no_such_module:Sampler
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    monkeypatch.delitem(__import__("sys").modules, "qvae_brute_plugin", raising=False)
    registry.refresh()


# --------------------------------------------------------------- third-party backends
def test_entry_point_backend_is_listed_built_validated_and_conforms(plugins, capsys):
    assert "brute" in backends.registered() and "brute" in backends.available()
    assert registry.option_names("brute") == ["max_units", "beta"]
    sampler = backends.get_sampler("brute", beta=0.5)
    assert sampler.options.beta == 0.5 and sampler.options.max_units == 16
    with pytest.raises(OptionError, match=r"backend 'brute' option max_units must be less "
                       r"than or equal to 20, got 40 \(max_units: most units"):
        backends.get_sampler("brute", max_units=40)
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['units'\]"):
        backends.get_sampler("brute", units=3)
    report = run_conformance("brute", num_samples=4000)
    assert [row["tv"] <= row["tv_tolerance"] for row in report["distribution"]] == [True, True]
    out = backends.as_dimod("brute").sample(random_rbm(2, 2).to_bqm(), num_reads=5, seed=0)
    assert len(out) == 5
    # the CLI listing and a run config see it like a built-in
    assert cli_main(["backends"]) == 0
    assert "brute" in capsys.readouterr().out
    cfg = load_config(None, ["backend.name=brute", "backend.options.beta=2.0"])
    assert cfg.backend.options == {"beta": 2.0}
    with pytest.raises(ConfigError, match=r"backend\.options\.beta: .*got -1"):
        load_config(None, ["backend.name=brute", "backend.options.beta=-1"])
    # and a service serves it, listing its declarations
    service = Service(ServiceConfig(require_auth=False))
    assert "brute" in service.config.served_backends()
    listing = service.backends_for(OPEN_KEY).backends["brute"]
    assert listing.options == ["max_units", "beta"] and listing.resource == "cpu"


def test_a_broken_entry_point_is_one_clear_line_and_built_ins_still_work(plugins, capsys):
    assert "broken" in backends.registered()
    with pytest.raises(registry.BackendLoadError) as err:
        registry.sampler_class("broken")
    msg = str(err.value)
    assert "\n" not in msg and "qvae.backends" in msg and "qvae_no_such_module" in msg
    assert "broken = 'qvae_no_such_module:Sampler'" in msg and "qvae-brute-plugin" in msg
    ok, why = backends.availability()["broken"]
    assert not ok and why == msg
    assert "broken" not in backends.available() and "exact" in backends.available()
    assert backends.get_sampler("exact").sample(random_rbm(3, 2), 4, seed=0).visible.shape[0] == 4
    assert load_config(None, ["backend.name=neal"]).backend.name == "neal"
    with pytest.raises(ConfigError, match="cannot be loaded from entry point broken"):
        load_config(None, ["backend.name=broken"])
    assert "broken" not in ServiceConfig(require_auth=False).served_backends()
    assert cli_main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "unavailable" in out and "exact" in out


# ------------------------------------------------------------------- where options enter
@pytest.mark.parametrize("overrides, field", [
    (["backend.name=neal", "backend.options.num_sweeps=0"], r"backend\.options\.num_sweeps"),
    (["backend.name=neal", "backend.options.mode=quantum"], r"backend\.options\.mode"),
    (["backend.name=exact", "backend.options.max_states=1"], r"backend\.options\.max_states"),
    (["backend.name=remote", "backend.target=neal", "backend.options.num_sweeps=0"],
     r"backend\.options\.num_sweeps"),
    (["backend.name=remote", "backend.target=neal", "backend.remote.max_retries=-1"],
     r"backend\.remote\.max_retries"),
])
def test_a_bad_option_value_fails_at_config_load_naming_the_field(overrides, field):
    """Before, only the names were checked at load: a bad value failed once training had
    built its data and model and called the sampler."""
    with pytest.raises(ConfigError, match=rf"\n  {field}: backend '\w+' option .* got "):
        load_config(None, overrides)


def test_a_remote_api_key_is_not_echoed_by_its_option_error():
    with pytest.raises(ConfigError, match=r"backend\.remote\.api_key: .*got a int") as err:
        load_config(None, ["backend.name=remote", "backend.target=neal",
                                           "backend.remote.api_key=12345678"])
    assert "12345678" not in str(err.value)


def test_a_service_policy_with_a_bad_value_fails_at_startup():
    with pytest.raises(ConfigError, match=r"backends\.neal\.options\.num_sweeps: .*got 0"):
        load_service_config(None, ["backends={neal: {options: {num_sweeps: 0}}}"])


@pytest.mark.parametrize("backend, options, option", [
    ("neal", {"num_sweeps": 0}, "num_sweeps"),
    ("gibbs", {"beta": -1.0}, "beta"),
    ("exact", {"max_states": True}, "max_states"),
    ("neal", {"sweeps": 3}, "sweeps"),
])
def test_a_service_request_with_a_bad_value_is_refused_naming_the_option(backend, options,
                                                                        option):
    service = Service(ServiceConfig(require_auth=False))
    rbm = random_rbm(3, 2)
    req = SampleRequest.model_validate({
        "backend": backend, "num_samples": 4, "options": options,
        "rbm": {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
                "hidden_bias": rbm.hidden_bias.tolist()}})
    with pytest.raises(ServiceError) as err:
        service.plan(req, OPEN_KEY)
    assert err.value.status_code == 422
    (detail,) = err.value.detail
    assert detail["loc"] == ["body", "options", option], detail
    assert f"backend {backend!r}" in detail["msg"] and option in detail["msg"]


# ------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("name", BUILTIN)
def test_every_backend_declares_its_options_with_descriptions(name):
    cls = registry.sampler_class(name)
    assert issubclass(cls.Options, BackendOptions) and cls.Options is not BackendOptions
    with pytest.raises(OptionError, match=rf"unknown option\(s\) \['no_such'\] for backend "
                       rf"'{name}'"):  # the class's own model checks, before any set-up
        cls(no_such=1)
    assert cls.option_names() == registry.option_names(name) == list(cls.Options.model_fields)
    undescribed = [f for f, info in cls.Options.model_fields.items()
                   if not (info.description or "").strip()]
    assert not undescribed, f"{name}: options without a description: {undescribed}"


def test_readme_option_tables_match_the_declarations():
    text = docs.README.read_text(encoding="utf-8")
    assert sorted(docs.blocks(text)) == sorted(BUILTIN), "a backend without a README table"
    assert docs.stale(text) == [], "run `python -m backends.docs` to rewrite them"
    assert docs.main(["--check"]) == 0


def test_docs_check_fails_on_a_stale_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- options:neal -->\n| old |\n<!-- /options:neal -->\n")
    assert docs.main([str(readme), "--check"]) == 1
    assert "['neal']" in capsys.readouterr().err
    assert docs.main([str(readme)]) == 0
    assert docs.main([str(readme), "--check"]) == 0
    assert "`num_sweeps` | `200`" in readme.read_text()


def test_any_graph_is_declared_by_exactly_the_backends_that_have_a_kernel_for_it():
    """`capabilities.any_graph` is a declaration, not introspection: it must agree with what
    each built-in implements (its own `_sample_bm`, or general BQMs)."""
    from backends.base import Sampler

    for name in ("exact", "gibbs", "neal", "dwave", "langevin", "mala", "remote", "dimod"):
        cls = registry.sampler_class(name)
        has_kernel = cls._sample_bm is not Sampler._sample_bm or cls.capabilities.general_bqm
        assert cls.capabilities.any_graph == has_kernel, name
