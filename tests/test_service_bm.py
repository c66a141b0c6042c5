"""Issue 13 at the service boundary: Boltzmann machines on any graph (`bm` payloads, and `bqm`
payloads with odd cycles) and clamped units (`clamp`) through the service, the `remote` client
and `as_dimod`.

Distributions are checked against exact enumeration by total variation over the full state with
`backends.testing.tv_tolerance(p, N, delta=1e-6)`: E[TV] ≤ ½ Σ_k sqrt(p_k (1 − p_k) / N) for N
exact draws, and TV moves by at most 1/N when one draw changes, so (McDiarmid) it exceeds that
expectation by sqrt(log(1/δ) / 2N) with probability ≤ δ = 10⁻⁶. Every sampler here is seeded, so
a test is deterministic; the tolerance says the seed was not chosen to pass.
"""

import json
import math

import dimod
import httpx
import numpy as np
import pytest
import torch

import backends
from backends.remote import RemoteError
from backends.testing import random_rbm, total_variation, tv_tolerance
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import from_rbm
from qvae.service.testing import running_service

KEY = "service-bm-key-0001"
HEADERS = {"Authorization": f"Bearer {KEY}"}
N = 20000
LIMITS = {"max_variables": 64, "max_couplings": 500, "max_num_samples": 50_000,
          "cpu_workers": 2}
EMULATOR = {"dwave": {"options": {"solver": "emulator", "beta_eff": 6.0}, "locked": ["solver"]}}


@pytest.fixture(scope="module")
def url():
    with running_service({"keys": [{"key": KEY}], "limits": LIMITS,
                          "backends": EMULATOR}) as base:
        yield base


def odd_cycles_bm() -> BoltzmannMachine:
    """6 labelled units, two triangles and a 5-cycle: three colour classes, not an RBM."""
    edges = [(0, 1), (1, 2), (0, 2), (2, 3), (3, 4), (2, 4), (4, 5), (0, 5)]
    gen = torch.Generator().manual_seed(3)
    coupling = torch.randn(len(edges), generator=gen, dtype=torch.float64) * 0.9
    bias = torch.randn(6, generator=gen, dtype=torch.float64) * 0.5
    bm = BoltzmannMachine(list("abcdef"), edges, bias=bias, coupling=coupling,
                          dtype=torch.float64)
    assert len(bm.colour_classes) == 3
    return bm


def bm_json(bm: BoltzmannMachine, labels: bool = True) -> dict:
    out = {"bias": bm.bias.tolist(), "edges": bm.edges.tolist(), "coupling": bm.coupling.tolist()}
    if labels:
        out["variables"] = list(bm.variables)
    return out


def rbm_json(rbm) -> dict:
    return {"weight": rbm.weight.tolist(), "visible_bias": rbm.visible_bias.tolist(),
            "hidden_bias": rbm.hidden_bias.tolist()}


def post(url, body, timeout=60):
    return httpx.post(f"{url}/v1/sample", json=body, headers=HEADERS, timeout=timeout)


def conditional(log_p: torch.Tensor, n: int, clamp: dict) -> torch.Tensor:
    """p(z | z_C = x_C) over all 2^n states (bit i of the index = unit i)."""
    index = torch.arange(2**n)
    keep = torch.ones(2**n, dtype=torch.bool)
    for unit, value in clamp.items():
        keep &= ((index >> unit) & 1) == value
    log_p = torch.where(keep, log_p, torch.tensor(-math.inf, dtype=log_p.dtype))
    return torch.softmax(log_p, 0)


def load(url) -> int:
    health = httpx.get(f"{url}/healthz").json()
    return health["queued"] + health["running"]


def samples_served(url) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("qvae_samples_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ BM payloads
@pytest.mark.parametrize("backend", ["gibbs", "neal", "exact"])
def test_a_bm_request_follows_the_exact_distribution(url, backend):
    bm = odd_cycles_bm()
    r = post(url, {"backend": backend, "num_samples": N, "bm": bm_json(bm), "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["variables"] == list("abcdef") and body["vartype"] == "BINARY"
    assert body["num_visible"] is None and body["served_by"] == backend
    states = torch.tensor(body["samples"], dtype=torch.float64)
    assert states.shape == (N, 6) and set(states.unique().tolist()) <= {0.0, 1.0}
    assert np.allclose(body["energies"], bm.energy(states).detach().numpy())
    p = bm.exact_log_probs().exp()
    assert total_variation(states, p) <= tv_tolerance(p, N)


def test_a_non_bipartite_bqm_reaches_gibbs_as_a_boltzmann_machine(url):
    """Before: gibbs answered 422 ("samples RBMs only") to any BQM with an odd cycle."""
    bqm = odd_cycles_bm().to_bqm(dimod.SPIN)
    bqm.offset += 1.25
    r = post(url, {"backend": "gibbs", "num_samples": N, "bqm": bqm.to_serializable(), "seed": 2})
    assert r.status_code == 200, r.text
    ss = dimod.SampleSet.from_serializable(r.json())
    assert ss.vartype is dimod.SPIN and list(ss.variables) == list("abcdef")
    dimod.testing.assert_sampleset_energies(ss, bqm)
    z = torch.tensor((ss.record.sample + 1) / 2, dtype=torch.float64)
    p = odd_cycles_bm().exact_log_probs().exp()
    assert total_variation(z, p) <= tv_tolerance(p, N)


@pytest.mark.parametrize("clamp", [None, {"0": 1, "3": 0}])
def test_a_bm_reaches_the_qpu_backend(url, clamp):
    """dwave (on the MockDWaveSampler emulator) gets the BM itself: its labels, all its units;
    its accuracy is tests/test_dwave_bm.py's business."""
    bm = odd_cycles_bm()
    r = post(url, {"backend": "dwave", "num_samples": 50, "seed": 1, "bm": bm_json(bm),
                   "clamp": clamp}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["served_by"] in ("dwave", "emulator") and body["variables"] == list("abcdef")
    states = torch.tensor(body["samples"], dtype=torch.float64)
    assert states.shape == (50, 6)
    assert np.allclose(body["energies"], bm.energy(states).detach().numpy())
    for unit, value in (clamp or {}).items():
        assert bool((states[:, int(unit)] == value).all())
    assert body["info"].get("clamped") == (len(clamp) if clamp else None)


def test_backends_say_which_sample_any_graph(url):
    listed = httpx.get(f"{url}/v1/backends", headers=HEADERS).json()["backends"]
    assert {name for name, info in listed.items() if info["any_graph"]} >= {
        "gibbs", "neal", "exact", "dwave"}
    assert not listed["langevin"]["any_graph"] and not listed["mala"]["any_graph"]


# ------------------------------------------------------------------ clamp
CLAMPS = {"bm": {0: 1, 3: 0}, "rbm": {0: 1, 6: 0}}


@pytest.mark.parametrize("kind", ["bm", "rbm"])
@pytest.mark.parametrize("backend", ["gibbs", "neal", "exact"])
def test_clamp_holds_and_follows_the_exact_conditional(url, backend, kind):
    if kind == "bm":
        model = odd_cycles_bm()
        problem, full = {"bm": bm_json(model)}, model
    else:
        model = random_rbm(5, 3, seed=8).float64_copy()
        problem, full = {"rbm": rbm_json(model)}, from_rbm(model)
    clamp = CLAMPS[kind]
    r = post(url, {"backend": backend, "num_samples": N, "seed": 9, **problem,
                   "clamp": {str(k): v for k, v in clamp.items()}})
    assert r.status_code == 200, r.text
    body = r.json()
    states = torch.tensor(body["samples"], dtype=torch.float64)
    for unit, value in clamp.items():
        assert bool((states[:, unit] == value).all()), f"unit {unit} left its value {value}"
    assert body["info"]["clamped"] == len(clamp)
    # energies under the full model, not the reduced one
    assert np.allclose(body["energies"], full.energy(states).detach().numpy())
    p = conditional(full.exact_log_probs(), full.n_units, clamp)
    assert total_variation(states, p) <= tv_tolerance(p, N)


# ------------------------------------------------------------------ bad payloads: 422
def triangle_bqm():
    return dimod.BinaryQuadraticModel({"a": 0.1, "b": 0.2, "c": -0.3},
                                      {("a", "b"): 0.5, ("b", "c"): -0.4, ("a", "c"): 0.3},
                                      0.0, "SPIN").to_serializable()


def bm_with(**change):
    return {"bm": {**bm_json(odd_cycles_bm()), **change}}


BAD = {  # request change -> the loc the 422 must name (and words of its message)
    "clamp index out of range": ({"clamp": {"6": 1}}, ["body", "clamp", "6"]),
    "clamp value 2": ({"clamp": {"1": 2}}, ["body", "clamp", "1"]),
    "clamp value true": ({"clamp": {"1": True}}, ["body", "clamp", "1"]),
    "clamp value 1.0": ({"clamp": {"1": 1.0}}, ["body", "clamp", "1"]),
    "clamp key -1": ({"clamp": {"-1": 0}}, ["body", "clamp", "-1"]),
    "clamp key 01": ({"clamp": {"01": 0}}, ["body", "clamp", "01"]),
    "clamp key a": ({"clamp": {"a": 0}}, ["body", "clamp", "a"]),
    "clamp on a bqm": ({"bm": None, "bqm": triangle_bqm(), "clamp": {"0": 1}},
                       ["body", "clamp"], "fix_variable"),
    "coupling count": (bm_with(coupling=[0.5]), ["body", "bm", "coupling"]),
    "edge out of range": (bm_with(edges=[[0, 1], [1, 7]], coupling=[1.0, 1.0]),
                          ["body", "bm", "edges", 1]),
    "self-loop": (bm_with(edges=[[2, 2]], coupling=[1.0]), ["body", "bm", "edges", 0]),
    "edge twice": (bm_with(edges=[[0, 1], [1, 0]], coupling=[1.0, 1.0]),
                   ["body", "bm", "edges"]),
    "edge index 1.5": (bm_with(edges=[[0, 1.5]], coupling=[1.0]), ["body", "bm", "edges", 0]),
    "edge of three": (bm_with(edges=[[0, 1, 2]], coupling=[1.0]), ["body", "bm", "edges", 0]),
    "label count": (bm_with(variables=["a", "b"]), ["body", "bm", "variables"]),
    "label twice": (bm_with(variables=list("abcdea")), ["body", "bm", "variables"]),
    "label a list": (bm_with(variables=[[0], 1, 2, 3, 4, 5]), ["body", "bm", "variables", 0]),
    "parts not independent": (bm_with(parts=[[0, 1, 2], [3, 4, 5]]), ["body", "bm", "parts"]),
    "parts miss a unit": (bm_with(parts=[[0], [1]]), ["body", "bm", "parts"]),
    "NaN bias": (bm_with(bias=[0.0, float("nan"), 0, 0, 0, 0]), ["body", "bm", "bias", 1]),
    "no bias": (bm_with(bias=[]), ["body", "bm", "bias"]),
    "bm and rbm": ({"rbm": rbm_json(random_rbm(2, 2, seed=0))}, ["body"], "exactly one of"),
    "odd cycles to langevin": ({"backend": "langevin"}, ["body", "bm"], "3 colour classes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_clamp_and_bm_payloads_get_422_naming_the_field(url, case):
    change, loc, *words = BAD[case]
    body = {"backend": "exact", "num_samples": 4, "seed": 0, **bm_with(), **change}
    body = {k: v for k, v in body.items() if v is not None}
    # json.dumps writes NaN as the server's JSON parser reads it (httpx's json= refuses it)
    r = httpx.post(f"{url}/v1/sample", content=json.dumps(body), timeout=30,
                   headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(err["loc"][:len(loc)] == loc and all(w in err["msg"] for w in words)
               for err in detail), detail
    assert load(url) == 0


# ------------------------------------------------------------------ size and work: 413
def complete_multipartite(sizes) -> BoltzmannMachine:
    starts = np.cumsum([0, *sizes])
    part = np.repeat(np.arange(len(sizes)), sizes)
    n = int(starts[-1])
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if part[i] != part[j]]
    return BoltzmannMachine(n, edges, init_std=0.1, seed=0, dtype=torch.float64,
                            parts=[list(range(starts[k], starts[k + 1]))
                                   for k in range(len(sizes))])


OVERSIZE = {  # request -> words the 413 detail must hold
    "variables": ({"backend": "gibbs", "bm": bm_json(complete_multipartite([10, 10, 10, 40]),
                                                     labels=False)},
                  ["variables = 70", "limit of 64"]),
    "couplings of a bm": ({"backend": "gibbs", "bm": bm_json(
        complete_multipartite([12, 12, 12, 12]), labels=False)},
        ["couplings of the bm = 864", "limit of 500"]),
    "couplings of a bqm": ({"backend": "neal", "bqm": complete_multipartite(
        [12, 12, 12, 12]).to_bqm().to_serializable()}, ["couplings of the bqm = 864"]),
    "gibbs sweeps": ({"backend": "gibbs", "bm": bm_json(odd_cycles_bm()),
                      "options": {"num_sweeps": 10**12}}, ["num_sweeps", "limits.max_work"]),
    "exact enumeration": ({"backend": "exact", "bm": bm_json(
        complete_multipartite([12, 12, 12]), labels=False), "options": {"max_states": 2**30}},
        ["limits.max_enumerated_states"]),
}


@pytest.mark.parametrize("case", list(OVERSIZE))
def test_an_oversize_bm_is_refused_at_admission(url, case):
    request, words = OVERSIZE[case]
    if "bm" in request:  # a clamp makes the work smaller, never the price
        request = {**request, "clamp": {"0": 1}}
    before = samples_served(url)
    r = post(url, {"num_samples": 100, "seed": 0, **request})
    assert r.status_code == 413, r.text
    for word in words:
        assert word in str(r.json()["detail"]), r.json()
    assert load(url) == 0 and samples_served(url) == before  # nothing queued, nothing drawn


# ------------------------------------------------------------------ remote client
@pytest.fixture
def seen(monkeypatch):
    """The requests the service admitted (its own `plan`, recorded): what the client sent."""
    from qvae.service.app import Service

    requests, plan = [], Service.plan

    def record(self, req, key):
        requests.append(req)
        return plan(self, req, key)

    monkeypatch.setattr(Service, "plan", record)
    return requests


@pytest.mark.parametrize("mode", ["inline", "job"])
def test_remote_sends_the_whole_bm_and_the_clamp(url, seen, mode):
    bm, clamp = odd_cycles_bm(), {0: 1, 3: 0}
    remote = backends.get_sampler("remote", url=url, target="gibbs", api_key=KEY, mode=mode)
    out = remote.sample(bm, 500, seed=4, clamp=clamp)
    (req,) = seen
    assert req.bm is not None and len(req.bm.bias) == 6 and req.clamp == clamp
    assert req.bm.variables == list("abcdef")
    local = backends.get_sampler("gibbs").sample(bm, 500, seed=4, clamp=clamp)
    assert not out.layered and torch.equal(out.states, local.states)  # the server did the work
    assert torch.allclose(out.energy, bm.energy(out.states))
    assert out.info["clamped"] == 2 and out.info["served_by"] == "gibbs"
    plain = remote.sample(bm, 300, seed=6)  # no clamp: a bm payload too
    assert seen[1].bm is not None and seen[1].clamp is None
    assert torch.equal(plain.states, backends.get_sampler("gibbs").sample(bm, 300, seed=6).states)


def test_remote_sends_the_whole_rbm_and_the_clamp(url, seen):
    rbm, clamp = random_rbm(5, 3, seed=8), {0: 1, 6: 0}
    out = backends.get_sampler("remote", url=url, target="neal", api_key=KEY).sample(
        rbm, 400, seed=3, clamp=clamp)
    (req,) = seen
    assert req.rbm is not None and len(req.rbm.visible_bias) == 5 and req.clamp == clamp
    assert out.layered and out.visible.shape == (400, 5) and out.hidden.shape == (400, 3)
    assert bool((out.visible[:, 0] == 1).all()) and bool((out.hidden[:, 1] == 0).all())
    local = backends.get_sampler("neal").sample(rbm, 400, seed=3, clamp=clamp)
    assert torch.equal(out.states, local.states)


def test_remote_reports_a_backend_that_cannot_sample_the_graph(url):
    remote = backends.get_sampler("remote", url=url, target="langevin", api_key=KEY)
    with pytest.raises(RemoteError, match="3 colour classes") as info:
        remote.sample(odd_cycles_bm(), 10, seed=0)
    assert info.value.status_code == 422


# ------------------------------------------------------------------ Ocean
def test_as_dimod_gibbs_samples_a_non_bipartite_bqm():
    """Before: ValueError "odd cycle ... use 'neal', 'exact' or 'dimod'"."""
    bqm = odd_cycles_bm().to_bqm(dimod.SPIN)
    bqm.relabel_variables({v: f"q{v}" for v in bqm.variables})
    sampler = backends.as_dimod("gibbs")
    assert sampler.properties["any_graph"]
    ss = sampler.sample(bqm, num_reads=N, seed=1)
    assert ss.vartype is dimod.SPIN and list(ss.variables) == [f"q{v}" for v in "abcdef"]
    dimod.testing.assert_sampleset_energies(ss, bqm)
    z = torch.tensor((ss.record.sample + 1) / 2, dtype=torch.float64)
    p = odd_cycles_bm().exact_log_probs().exp()
    assert total_variation(z, p) <= tv_tolerance(p, N)
