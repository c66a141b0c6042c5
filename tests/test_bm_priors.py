"""Training with Boltzmann-machine priors (`model.prior`) and the class-conditional mode."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import backends
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import multipartite
from qvae.boltzmann_logz import exact_log_partition
from qvae.checkpoint import load_model
from qvae.cli import main
from qvae.compare import compare_backends
from qvae.config import Config, ConfigError, load_config
from qvae.datasets import (
    MNIST_TEST_CLASS_COUNTS,
    load_labelled_mnist,
    load_mnist,
    mnist_test_labels,
)
from qvae.dvae import DVAE
from qvae.evaluate import estimate_log_z
from qvae.rbm import RBM
from qvae.report import class_samples, decode
from qvae.train import build_model, train

TINY = ["model.n_visible=8", "model.n_hidden=8", "model.encoder_hidden=[16]",
        "model.decoder_hidden=[16]", "data.batch_size=20", "backend.num_samples=20",
        "train.steps=4", "train.log_every=2", "train.checkpoint_every=4", "train.sample_grid=4",
        "eval.num_iw=5", "eval.max_examples=20", "data.eval_batch_size=20", "seed=0",
        "threads=1"]
PRIORS = {
    "rbm": [],
    "multipartite": ["model.prior.kind=multipartite", "model.prior.parts=4"],
    "multipartite_sizes": ["model.prior.kind=multipartite", "model.prior.sizes=[6, 5, 5]",
                           "model.prior.density=0.5"],
    "qpu_native": ["model.prior.kind=qpu_native", "model.prior.topology=pegasus",
                   "model.prior.shape=3", "model.prior.partitions=4"],
    "qpu_native_emulator": ["model.prior.kind=qpu_native", "model.prior.graph=backend",
                            "backend.name=dwave", "backend.options.solver=emulator",
                            "backend.options.topology=zephyr", "backend.options.topology_shape=2",
                            "model.prior.partitions=4"],
}


def tiny(*extra: str) -> Config:
    return load_config(None, [*TINY, *extra])


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, field", [
    (["model.prior.kind=multipartite"], "model.prior.sizes"),
    (["model.prior.kind=multipartite", "model.prior.sizes=[8, 7]"], "model.prior.sizes"),
    (["model.prior.kind=multipartite", "model.prior.parts=3"], "model.prior.parts=3"),
    (["model.prior.kind=multipartite", "model.prior.parts=4", "model.prior.sizes=[8, 8]"],
     "model.prior.sizes"),
    (["model.prior.kind=qpu_native", "model.prior.topology=pegasus"], "model.prior.shape"),
    (["model.prior.kind=qpu_native", "model.prior.topology=pegasus", "model.prior.shape=3",
      "model.prior.partitions=3"], "model.prior.partitions=3"),
    (["model.prior.kind=qpu_native", "model.prior.graph=backend"], "backend dwave"),
    (["model.prior.density=0.5"], "model.prior.density"),
    (["model.prior.kind=grid"], "model.prior.kind"),
    (["model.conditional.label_units=16"], "model.conditional.label_units"),
    (["model.conditional.label_units=2"], "data.dataset=mnist-labelled"),
    (["model.kind=sde", "model.prior.kind=multipartite", "model.prior.parts=4"],
     "kind=dvae only"),
])
def test_prior_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny(*overrides)


def test_prior_config_error_is_one_line_in_the_cli(capsys):
    assert main(["config", "--set", "model.prior.kind=multipartite",
                 "--set", "model.prior.sizes=[50, 50]"]) == 2
    err = capsys.readouterr().err
    assert "model.prior.sizes [50, 50] sum to 100, not the 200 latent units" in err
    assert "Traceback" not in err


def test_default_prior_is_the_rbm_unchanged():
    cfg = Config()
    assert cfg.model.prior.kind == "rbm" and cfg.model.conditional.label_units == 0
    model = build_model(tiny())
    assert isinstance(model.prior, RBM) and (model.prior.n_visible, model.prior.n_hidden) == (8, 8)
    args = model.config_dict()
    assert args["prior"] is None and args["label_units"] == 0
    # the RBM model's state dict keeps its keys (old checkpoints load)
    assert {"prior.weight", "prior.visible_bias", "prior.hidden_bias"} <= set(model.state_dict())


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_train_evaluate_reload_each_prior_kind(kind, tmp_path):
    cfg = tiny(*PRIORS[kind])
    res = train(cfg, tmp_path / kind, progress=False)
    assert res.step == 4
    ev = json.loads((tmp_path / kind / "eval.json").read_text())
    assert np.isfinite(ev["nll"]) and ev["method"] == "exact"  # ≤ 20 enumerated units
    model, saved, _ = load_model(tmp_path / kind)
    assert saved.model.prior.kind == cfg.model.prior.kind
    prior = model.log_z_prior()
    assert isinstance(prior, RBM if kind == "rbm" else BoltzmannMachine)
    assert prior.n_units == 16
    # the reloaded model is the trained one: same log Z as the evaluation used
    assert float(prior.log_partition()) == pytest.approx(ev["log_z"], abs=1e-5)
    if kind.startswith("multipartite"):
        sizes = [4, 4, 4, 4] if kind == "multipartite" else [6, 5, 5]
        assert [len(c) for c in prior.colour_classes] == sizes
    if kind == "multipartite":  # `qvae compare` on the checkpoint: exact reference (16 units)
        assert main(["compare", str(tmp_path / kind), "--backends", "exact,gibbs", "-n", "300",
                     "--grid", "4", "--out", str(tmp_path / "cmp")]) == 0
        result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
        assert result["reference"] == "exact" and result["n_units"] == 16
        assert (tmp_path / "cmp" / "samples_gibbs.png").is_file()
    if kind == "qpu_native_emulator":  # every coupler is one the emulated QPU has
        sampler = backends.get_sampler("dwave", solver="emulator", topology="zephyr",
                                       topology_shape=2)
        assert sampler.client.connect()
        graph = sampler.client.graph
        edges = [(prior.variables[i], prior.variables[j]) for i, j in prior.edges.tolist()]
        assert edges and all(graph.has_edge(u, v) for u, v in edges)
        assert res.sampling["calls"] == 4


def test_bm_prior_log_z_by_ais_agrees_with_exact(tmp_path):
    cfg = tiny(*PRIORS["multipartite"], "eval.logz=ais", "eval.ais_betas=2000",
               "eval.ais_runs=200")
    model = build_model(cfg)
    with torch.no_grad():  # couplings large enough that log Z is not the trivial one
        model.prior.coupling.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        model.prior.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ais = estimate_log_z(model.log_z_prior(), cfg)
    exact = exact_log_partition(model.prior)
    assert ais["method"] == "ais"
    assert abs(ais["log_z"] - exact) < 4 * ais["log_z_std"] + 0.02
    auto = estimate_log_z(model.log_z_prior(), tiny(*PRIORS["multipartite"]))
    assert auto["method"] == "exact" and auto["log_z"] == pytest.approx(exact)


def test_dvae_energy_and_negative_phase_with_a_bm_prior():
    bm = multipartite([3, 3, 2], seed=0, scale=0.5)
    model = DVAE(n_pixels=6, n_visible=4, n_hidden=4, encoder_hidden=[8], decoder_hidden=[8],
                 prior=bm, seed=0)
    z = torch.bernoulli(torch.full((5, 8), 0.5), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.prior_energy(z), bm.energy(z))
    x = torch.bernoulli(torch.full((4, 6), 0.5), generator=torch.Generator().manual_seed(1))
    grads = []
    for neg in (torch.zeros(10, 8), torch.ones(10, 8)):
        model.zero_grad()
        loss, _ = model.loss(x, neg, tau=0.5, generator=torch.Generator().manual_seed(2))
        loss.backward()
        grads.append(bm.coupling.grad.clone())
    # d loss / dJ_ij = −E_q[z_i z_j] + mean_neg(z_i z_j) (the negative phase, −∇ of −log Z's
    # estimate): all-ones negatives raise every coupling's gradient by exactly 1
    assert torch.allclose(grads[1] - grads[0], torch.ones_like(grads[0]), atol=1e-5)
    with pytest.raises(ValueError, match="8 units"):
        DVAE(n_pixels=6, n_visible=4, n_hidden=5, prior=multipartite([3, 3, 2]))


def test_hierarchical_groups_with_a_bm_prior_bound_the_exact_likelihood():
    bm = multipartite([2, 2, 2, 2], seed=0, scale=0.8)
    model = DVAE(n_pixels=6, n_visible=4, n_hidden=4, encoder_hidden=[8], decoder_hidden=[8],
                 prior=bm, groups=4, seed=0)
    x = torch.bernoulli(torch.full((3, 6), 0.5), generator=torch.Generator().manual_seed(3))
    log_z = exact_log_partition(bm)
    exact = model.exact_log_px(x, log_z)
    iw = model.iw_bound(x, log_z, num_samples=4000, generator=torch.Generator().manual_seed(4))
    elbo = model.discrete_elbo(x, log_z, num_samples=200,
                               generator=torch.Generator().manual_seed(5))
    assert (elbo <= iw + 0.05).all() and (iw <= exact + 0.05).all()
    assert torch.allclose(iw, exact, atol=0.2)


# ---------------------------------------------------------------------- labels
def test_shipped_test_split_is_sorted_by_label_at_the_stated_boundaries():
    x = load_mnist("test")
    bounds = list(itertools.accumulate(MNIST_TEST_CLASS_COUNTS))
    assert bounds[-1] == len(x) == 10000
    cum = torch.cat([torch.zeros(1, 784), x.double().cumsum(0)])
    w = 200

    def jump(i: int) -> float:  # distance between the mean images of the w rows each side
        return float(((cum[i] - cum[i - w]) - (cum[i + w] - cum[i])).norm() / w)

    for b in bounds[:-1]:  # each stated boundary is where the pixel statistics change
        found = max(range(b - 100, b + 101), key=jump)
        assert abs(found - b) <= 15, (b, found)
    # and the blocks are classes: each image is nearest (Bernoulli likelihood) its own block's
    # mean image far more often than chance (0.1), and less so with boundaries shifted
    def accuracy(labels: torch.Tensor) -> float:
        p = torch.stack([x[labels == k].mean(0) for k in range(10)]).clamp(1e-3, 1 - 1e-3)
        ll = x @ p.log().T + (1 - x) @ (1 - p).log().T
        return float((ll.argmax(1) == labels).float().mean())

    labels = mnist_test_labels()
    assert accuracy(labels) > 0.8
    assert accuracy(labels.roll(300)) < accuracy(labels) - 0.1


def test_labelled_mnist_split():
    train_x, valid_x, test_x = (load_labelled_mnist(s) for s in ("train", "valid", "test"))
    assert train_x.shape == (9000, 794) and valid_x.shape == (1000, 794)
    assert torch.equal(valid_x, test_x)
    for part in (train_x, valid_x):
        assert torch.equal(part[:, 784:].sum(1), torch.ones(len(part)))
    # together: every test image once, with its own label
    both = torch.cat([train_x, valid_x])
    x = load_mnist("test")
    key = lambda rows: sorted(map(bytes, rows[:, :784].to(torch.uint8).numpy()))  # noqa: E731
    assert key(both) == key(x)
    i = 12345 % 9000
    row = train_x[i]
    matches = (x == row[:784]).all(1).nonzero().flatten()
    assert int(row[784:].argmax()) in mnist_test_labels()[matches].tolist()


# ---------------------------------------------------------------------- conditional
COND = ["data.dataset=mnist-labelled", "model.conditional.label_units=10"]


@pytest.mark.parametrize("prior", ["rbm", "multipartite"])
def test_conditional_train_grid_and_clamped_samples(prior, tmp_path, capsys):
    cfg = tiny(*COND, *PRIORS[prior], "model.n_visible=12", "model.n_hidden=12")
    out = tmp_path / prior
    res = train(cfg, out, progress=False)
    assert (out / "samples_by_class.png").is_file() and "samples_by_class" in res.files
    ev = json.loads((out / "eval.json").read_text())
    assert ev["label_units"] == 10 and "not comparable" in ev["note"]
    model, _, _ = load_model(out)
    assert model.label_units == 10 and model.n_inputs == 794
    sampler = backends.get_sampler("gibbs", num_sweeps=2, burn_in=10)
    sets = class_samples(model, sampler, per_class=5, seed=0)
    for c, s in enumerate(sets):
        onehot = torch.nn.functional.one_hot(torch.tensor(c), 10).float()
        assert torch.equal(s.states[:, :10], onehot.expand(5, 10))  # clamped units held
        images = decode(model, s)
        assert images.shape == (5, 784) and ((images >= 0) & (images <= 1)).all()
    assert main(["sample", str(out), "--label", "3", "-n", "4",
                 "--out", str(tmp_path / "three.png")]) == 0
    assert (tmp_path / "three.png").is_file()
    assert main(["sample", str(out), "--label", "10", "--out", str(tmp_path / "x.png")]) == 2
    assert "classes are 0..9" in capsys.readouterr().err


def test_conditional_model_checks_its_labels():
    model = DVAE(n_pixels=4, n_visible=3, n_hidden=3, encoder_hidden=[4], decoder_hidden=[4],
                 label_units=2)
    assert model.check_input(torch.tensor([[1.0, 0, 1, 0, 0, 1]])).shape == (1, 6)
    with pytest.raises(ValueError, match="not one-hot"):
        model.check_input(torch.tensor([[1.0, 0, 1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="6"):
        model.check_input(torch.ones(1, 4))


def test_conditional_generation_follows_the_label(tmp_path):
    """A tiny synthetic labelled set: class 0 lights the first half of 8 pixels, class 1 the
    second. Generation clamped to each class must light its own half."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=gen)
    pixels = torch.zeros(400, 8)
    pixels[labels == 0, :4] = 1
    pixels[labels == 1, 4:] = 1
    noise = torch.rand(400, 8, generator=gen) < 0.05
    pixels = (pixels + noise.float()) % 2
    data = torch.cat([pixels, torch.nn.functional.one_hot(labels, 2).float()], 1).numpy()
    for split in ("train", "valid", "test"):
        np.save(tmp_path / f"{split}.npy", data)
    cfg = load_config(None, [
        f"data.dataset={tmp_path}", "model.n_visible=3", "model.n_hidden=3",
        "model.encoder_hidden=[16]", "model.decoder_hidden=[16]", "data.batch_size=50",
        "model.conditional.label_units=2", "model.prior.kind=multipartite",
        "model.prior.sizes=[2, 2, 2]", "backend.name=exact", "backend.num_samples=50",
        "train.steps=300", "train.lr=0.01", "train.sample_grid=0", "eval.at_end=false",
        "train.log_every=300", "train.checkpoint_every=300", "seed=0", "threads=1"])
    train(cfg, tmp_path / "run", progress=False)
    model, _, _ = load_model(tmp_path / "run")
    sampler = backends.get_sampler("exact")
    sets = class_samples(model, sampler, per_class=200, seed=0)
    means = [decode(model, s).mean(0) for s in sets]
    first, second = (torch.stack([m[:4].mean(), m[4:].mean()]) for m in means)
    assert first[0] > 0.7 and first[1] < 0.3, first
    assert second[1] > 0.7 and second[0] < 0.3, second


# ---------------------------------------------------------------------- compare
def test_compare_with_a_bm_prior():
    bm = multipartite([3, 3, 3], seed=0, scale=0.7)
    res = compare_backends(bm, ["exact", "gibbs"], num_samples=3000, seed=0)
    assert res["reference"] == "exact" and res["n_units"] == 9
    for row in res["backends"].values():
        assert row["tv_visible"] <= row["tv_noise_floor_q99"] + 0.02
        assert row["mean_rms_error"] < 0.05 and len(row["means"]) == 9
        assert row["beta_fit_ci"][0] <= 1.0 <= row["beta_fit_ci"][1]
    with pytest.raises(ValueError, match="colour classes"):
        compare_backends(bm, ["langevin"], num_samples=10)


def test_label_units_spanning_hierarchical_groups_hold_the_label():
    model = DVAE(n_pixels=4, n_visible=3, n_hidden=3, encoder_hidden=[8], decoder_hidden=[8],
                 groups=3, label_units=3, prior=multipartite([2, 2, 2], seed=0), seed=0)
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    x = torch.cat([torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]]), labels], 1)
    gen = torch.Generator().manual_seed(0)
    for tau in (None, 0.5):  # hard and relaxed draws: units 0-2 (groups 0 and 1) are the label
        _, z = model.posterior(x, 7, tau=tau, generator=gen)
        assert torch.equal(z[..., :3], labels.expand(7, 2, 3))
    loss, _ = model.loss(x, torch.zeros(4, 6), tau=0.5, generator=gen)
    loss.backward()
    assert torch.isfinite(model.iw_bound(x, 0.0, num_samples=20, generator=gen)).all()
    # log q leaves the (observed) label units out: z's label part does not enter it
    flat = DVAE(n_pixels=4, n_visible=3, n_hidden=3, encoder_hidden=[8], decoder_hidden=[8],
                label_units=3, seed=0)
    rest = torch.bernoulli(torch.full((5, 2, 3), 0.5), generator=gen)
    q = [flat.log_posterior(x, torch.cat([part.expand(5, 2, 3), rest], -1))
         for part in (labels, 1 - labels)]
    assert torch.equal(q[0], q[1])
    assert not torch.equal(q[0], flat.log_posterior(x, torch.cat([labels.expand(5, 2, 3),
                                                                   1 - rest], -1)))


@pytest.mark.parametrize("overrides, words", [
    (["data.dataset=mnist-labelled"], "set model.conditional.label_units=10"),
    (["backend.name=langevin", "backend.options={}", "model.prior.kind=multipartite",
      "model.prior.parts=4"],
     "samples RBMs and bipartite priors only"),
])
def test_a_prior_or_data_the_run_cannot_use_fails_at_load(overrides, words):
    """Checked at load, not after training has started (both used to end in a traceback)."""
    from qvae.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words):
        load_config("quickstart", overrides)
