import itertools
import math

import dimod
import pytest
import torch

from backends.testing import random_rbm
from qvae import RBM


def all_states(rbm):
    for bits in itertools.product([0.0, 1.0], repeat=rbm.n_units):
        z = torch.tensor(bits, dtype=rbm.weight.dtype)
        yield z[: rbm.n_visible], z[rbm.n_visible :]


def brute_log_z(rbm):
    rbm = rbm.float64_copy()
    with torch.no_grad():
        energies = [float(rbm.energy(v[None], h[None])) for v, h in all_states(rbm)]
    return math.log(sum(math.exp(-e) for e in energies))


def test_api_shapes_and_init():
    rbm = RBM(6, 4, seed=0)
    assert rbm.weight.shape == (6, 4) and rbm.visible_bias.shape == (6,)
    assert rbm.hidden_bias.shape == (4,)
    assert torch.all(rbm.visible_bias == 0) and torch.all(rbm.hidden_bias == 0)
    assert 0 < float(rbm.weight.detach().std()) < 0.05  # small couplings
    assert torch.equal(RBM(6, 4, seed=0).weight, rbm.weight)  # seeded
    assert not torch.equal(RBM(6, 4, seed=1).weight, rbm.weight)


def test_energy_matches_definition():
    rbm = random_rbm(5, 3, seed=0)
    v, h = torch.bernoulli(torch.full((7, 5), 0.5)), torch.bernoulli(torch.full((7, 3), 0.5))
    expected = torch.stack([
        -(rbm.visible_bias @ v[i]) - rbm.hidden_bias @ h[i] - v[i] @ rbm.weight @ h[i]
        for i in range(7)
    ])
    assert torch.allclose(rbm.energy(v, h), expected, atol=1e-6)


def test_free_energy_marginalises_hidden():
    rbm = random_rbm(4, 3, seed=3)
    v = torch.bernoulli(torch.full((5, 4), 0.5))
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    brute = torch.stack([
        -torch.logsumexp(-rbm.energy(vi.expand(8, 4), hs), 0) for vi in v
    ])
    assert torch.allclose(rbm.free_energy(v), brute, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_log_partition_matches_brute_force(shape):
    rbm = random_rbm(*shape, seed=4)
    assert float(rbm.log_partition()) == pytest.approx(brute_log_z(rbm), abs=1e-9)


def test_log_partition_chunks_and_limit():
    rbm = random_rbm(30, 18, scale=0.1, seed=5)
    chunked = rbm._neg_marginal_free_energies(chunk=1000)
    whole = rbm._neg_marginal_free_energies(chunk=2**18)
    assert torch.allclose(chunked, whole)
    with pytest.raises(ValueError, match="ais_log_partition"):
        RBM(30, 30).log_partition(max_states=2**20)


def test_conditionals():
    rbm = random_rbm(4, 3, seed=6)
    v = torch.bernoulli(torch.full((5, 4), 0.5))
    h = torch.bernoulli(torch.full((5, 3), 0.5))
    assert torch.allclose(rbm.p_h_given_v(v), torch.sigmoid(v @ rbm.weight + rbm.hidden_bias))
    assert torch.allclose(rbm.p_v_given_h(h), torch.sigmoid(h @ rbm.weight.T + rbm.visible_bias))


def test_bqm_round_trip_and_energies():
    rbm = random_rbm(5, 4, seed=7)
    bqm = rbm.to_bqm()
    assert bqm.vartype is dimod.BINARY and bqm.num_variables == 9
    for v, h in itertools.islice(all_states(rbm), 0, 512, 37):
        sample = dict(enumerate(torch.cat([v, h]).tolist()))
        with torch.no_grad():
            expected = float(rbm.energy(v[None], h[None]))
        assert bqm.energy(sample) == pytest.approx(expected, abs=1e-5)
    back = RBM.from_bqm(bqm, *rbm.variable_labels())
    for name in ("weight", "visible_bias", "hidden_bias"):
        assert torch.allclose(getattr(back, name), getattr(rbm, name), atol=1e-6)
    spin = RBM.from_bqm(bqm.change_vartype(dimod.SPIN, inplace=False), *rbm.variable_labels())
    assert torch.allclose(spin.weight, rbm.weight, atol=1e-5)


def test_from_bqm_rejects_intra_layer_couplings():
    bqm = dimod.BinaryQuadraticModel({0: 0, 1: 0, 2: 0}, {(0, 1): 1.0}, 0, dimod.BINARY)
    with pytest.raises(ValueError, match="within one layer"):
        RBM.from_bqm(bqm, [0, 1], [2])
    with pytest.raises(ValueError, match="partition"):
        RBM.from_bqm(bqm, [0], [2])


def test_ising_form_energies():
    rbm = random_rbm(3, 2, seed=8)
    h, j, offset = rbm.to_ising()
    for v, hid in all_states(rbm):
        s = 2 * torch.cat([v, hid]) - 1  # the spin of each unit
        e = offset + sum(h[i] * s[i] for i in h) + sum(b * s[a] * s[c] for (a, c), b in j.items())
        assert float(e) == pytest.approx(float(rbm.energy(v[None], hid[None]).detach()), abs=1e-5)


def test_mask():
    mask = torch.tensor([[1, 0], [0, 1], [1, 1]])
    rbm = RBM(3, 2, mask=mask, init_std=1.0, seed=0)
    assert torch.all(rbm.effective_weight()[mask == 0] == 0)
    assert rbm.to_bqm().num_interactions == 4
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\)"):
        RBM(3, 2, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        RBM(3, 2, mask=torch.full((3, 2), 0.5))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n_visible": 0, "n_hidden": 3}, ValueError, "n_visible"),
        ({"n_visible": 3, "n_hidden": 2.0}, TypeError, "n_hidden"),
        ({"n_visible": 3, "n_hidden": 2, "init_std": float("nan")}, ValueError, "init_std"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RBM(**kwargs)


def test_bad_parameters_and_inputs():
    rbm = RBM(3, 2)
    with torch.no_grad():
        rbm.visible_bias[1] = float("nan")
    with pytest.raises(ValueError, match="visible_bias"):
        rbm.to_bqm()
    with pytest.raises(ValueError, match="visible_bias"):
        rbm.log_partition()
    good = RBM(3, 2)
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        good.energy(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        good.free_energy([[0, 1, 0]])
