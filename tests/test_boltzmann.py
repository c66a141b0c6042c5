"""BoltzmannMachine: energies, conditionals, colouring, dimod/networkx/RBM conversion, log Z."""

import itertools
import math

import dimod
import networkx as nx
import pytest
import torch

from qvae import RBM
from qvae.boltzmann import BoltzmannMachine
from qvae.boltzmann_graphs import from_rbm, multipartite, qpu_native
from qvae.boltzmann_logz import ais_log_partition, exact_log_partition, log_partition
from qvae.logz import exact_log_partition as rbm_exact_log_partition
from qvae.rbm import enumerate_states


def cycle_with_chords(n=12, seed=0, scale=0.8):
    """A 5-cycle (odd) plus chords and a tail: not bipartite, 3+ colours."""
    g = nx.cycle_graph(5)
    g.add_edges_from([(4, 5), (5, 6), (6, 7), (7, 4), (0, 8), (8, 9), (9, 2), (6, 10)])
    g.add_edges_from([(10, 11), (11, 3), (1, 6), (2, 8)])
    g.add_nodes_from(range(n))
    gen = torch.Generator().manual_seed(seed)
    bm = BoltzmannMachine.from_networkx(g, init_std=scale, seed=seed, dtype=torch.float64)
    with torch.no_grad():
        bm.bias.copy_(torch.randn(bm.n_units, generator=gen, dtype=torch.float64) * 0.5)
    return bm


def brute_energy(bm, z):
    """E(z) from the definition, one state at a time, in Python floats."""
    b, j, e = bm.bias.tolist(), bm.coupling.tolist(), bm.edges.tolist()
    return [
        -sum(bi * zi for bi, zi in zip(b, row, strict=True))
        - sum(jk * row[i] * row[k] for jk, (i, k) in zip(j, e, strict=True))
        for row in z.tolist()
    ]


def brute_log_z(bm):
    z = enumerate_states(bm.n_units, 0, 2**bm.n_units, torch.float64)
    return math.log(sum(math.exp(-e) for e in brute_energy(bm, z)))


def test_energy_matches_the_definition_on_any_graph():
    bm = cycle_with_chords()
    gen = torch.Generator().manual_seed(1)
    z = torch.bernoulli(torch.full((9, bm.n_units), 0.5), generator=gen)
    assert torch.allclose(bm.energy(z), torch.tensor(brute_energy(bm, z), dtype=torch.float64))
    same = bm.sample_energy(z.float())  # a sampler's float32 states: float32, detached
    assert same.dtype == torch.float32 and not same.requires_grad
    assert torch.allclose(same.double(), bm.energy(z).detach(), atol=1e-5)
    # couplings are a parameter: the energy is differentiable in them
    bm.energy(z).sum().backward()
    assert bm.coupling.grad is not None and bm.coupling.grad.abs().sum() > 0


def test_edges_are_canonical_and_couplings_follow_them():
    bm = BoltzmannMachine(["x", "y", "z"], [(2, 0), (1, 0)], coupling=[3.0, 5.0], bias=[1, 2, 3])
    assert bm.edges.tolist() == [[0, 1], [0, 2]]
    assert bm.coupling.tolist() == [5.0, 3.0]  # (1,0) carried 5, (2,0) carried 3
    assert bm.index("z") == 2 and bm.variables == ["x", "y", "z"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variables=3, edges=[(1, 1)]), "self-loop"),
        (dict(variables=3, edges=[(0, 1), (1, 0)]), "given twice"),
        (dict(variables=3, edges=[(0, 3)]), "0..2"),
        (dict(variables=3, edges=[(0, 1)], bias=[0.0, float("nan"), 0.0]), "non-finite"),
        (dict(variables=3, edges=[(0, 1)], coupling=[float("inf")]), "non-finite"),
        (dict(variables=3, edges=[(0, 1)], coupling=[1.0, 2.0]), "coupling must have 1"),
        (dict(variables=["a", "a"], edges=[]), "repeated label"),
        (dict(variables=3, edges=[(0, 1)], parts=[[0, 1], [2]]), "same part"),
        (dict(variables=3, edges=[(0, 1)], parts=[[0], [1]]), "in no part"),
    ],
)
def test_bad_input_gets_a_one_line_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        BoltzmannMachine(**kwargs)
    assert "\n" not in str(info.value)


def test_validate_names_the_bad_unit_and_limits_are_enforced():
    bm = BoltzmannMachine(["a", "b", "c"], [(0, 1), (1, 2)])
    with torch.no_grad():
        bm.coupling[1] = float("nan")
    with pytest.raises(ValueError, match=r"edge \('b', 'c'\)"):
        bm.to_bqm()
    big = multipartite([20, 20, 20], seed=0)  # 40 units outside the largest class
    with pytest.raises(ValueError, match="annealed importance sampling") as info:
        big.log_partition()
    assert "\n" not in str(info.value) and "2^40 states" in str(info.value)
    with pytest.raises(ValueError, match="over the limit of 2\\^20"):
        big.exact_log_probs()
    with pytest.raises(ValueError, match="shape"):
        big.energy(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="undirected"):
        BoltzmannMachine.from_networkx(nx.DiGraph([(0, 1)]))


@pytest.mark.parametrize("seed", range(5))
def test_colouring_is_proper_on_random_graphs_with_odd_cycles(seed):
    g = nx.gnp_random_graph(30, 0.2, seed=seed)
    g.add_edges_from([(0, 1), (1, 2), (2, 0)])  # a triangle: at least 3 colours
    bm = BoltzmannMachine.from_networkx(g, seed=seed)
    classes = bm.colour_classes
    assert len(classes) >= 3
    assert sorted(torch.cat(classes).tolist()) == list(range(bm.n_units))
    colour = bm.colour
    assert (colour[bm.edges[:, 0]] != colour[bm.edges[:, 1]]).all()
    # deterministic: the same graph gets the same colouring
    again = BoltzmannMachine.from_networkx(g, seed=seed)
    assert torch.equal(again.colour, colour)


def test_bipartite_graph_gets_two_colours():
    bm = BoltzmannMachine.from_networkx(nx.grid_2d_graph(4, 5), seed=0)
    assert len(bm.colour_classes) == 2 and bm.variables[0] == (0, 0)


def test_multipartite_parts_are_the_colour_classes():
    sizes = [3, 5, 2, 4]
    bm = multipartite(sizes, seed=0)
    assert [c.tolist() for c in bm.colour_classes] == [
        [0, 1, 2], [3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]
    ]
    total = sum(a * b for a, b in itertools.combinations(sizes, 2))
    assert bm.n_edges == total
    sparse = multipartite(sizes, density=0.3, seed=1)
    assert sparse.n_edges == round(0.3 * total)
    assert (sparse.colour[sparse.edges[:, 0]] != sparse.colour[sparse.edges[:, 1]]).all()
    assert torch.equal(multipartite(sizes, density=0.3, seed=1).edges, sparse.edges)
    assert not torch.equal(multipartite(sizes, density=0.3, seed=2).edges, sparse.edges)
    with pytest.raises(ValueError, match="density"):
        multipartite(sizes, density=0.0)
    with pytest.raises(ValueError, match="at least two"):
        multipartite([4])


def random_bqm(vartype, seed=0):
    rng = torch.Generator().manual_seed(seed)
    labels = ["a", ("q", 1), 7, "d", ("q", 2), 11]
    g = nx.cycle_graph(5)  # odd cycle on the first five, plus chords
    g.add_edges_from([(0, 2), (3, 5), (1, 5)])
    bqm = dimod.BinaryQuadraticModel(vartype)
    for k in [3, 0, 5, 1, 4, 2]:  # an insertion order that is not the labels' order
        bqm.add_variable(labels[k], float(torch.randn(1, generator=rng)))
    for u, v in g.edges:
        bqm.add_interaction(labels[u], labels[v], float(torch.randn(1, generator=rng)))
    bqm.offset = 1.25
    return bqm


@pytest.mark.parametrize("vartype", [dimod.BINARY, dimod.SPIN])
def test_bqm_round_trip_keeps_labels_and_energies(vartype):
    bqm = random_bqm(vartype)
    bm = BoltzmannMachine.from_bqm(bqm, dtype=torch.float64)
    assert bm.variables == list(bqm.variables)
    z = enumerate_states(bm.n_units, 0, 2**bm.n_units, torch.float64)
    x = z if vartype is dimod.BINARY else 2 * z - 1
    ours = bm.energy(z)
    theirs = torch.as_tensor(bqm.energies((x.numpy(), bm.variables)))
    gap = theirs - ours  # the dropped constant, the same for every state
    assert torch.allclose(gap, gap[0].expand_as(gap), atol=1e-10)
    if vartype is dimod.BINARY:
        assert float(gap[0].detach()) == pytest.approx(bqm.offset)
    back = bm.to_bqm(vartype)
    assert back.vartype is vartype and list(back.variables) == bm.variables
    # the model's own BQM agrees exactly, its offset carrying the SPIN constant
    assert torch.allclose(
        torch.as_tensor(back.energies((x.numpy(), bm.variables))), ours, atol=1e-10
    )
    for v in bqm.variables:
        assert back.get_linear(v) == pytest.approx(bqm.get_linear(v))
    for (u, v), q in bqm.quadratic.items():
        assert back.get_quadratic(u, v) == pytest.approx(q)
    assert back.num_interactions == bqm.num_interactions
    again = BoltzmannMachine.from_bqm(back, dtype=torch.float64)
    assert torch.allclose(again.bias, bm.bias) and torch.equal(again.edges, bm.edges)
    assert torch.allclose(again.coupling, bm.coupling)


def test_from_networkx_attributes_mappings_and_seeded_init():
    g = nx.Graph()
    g.add_node("u", h=0.5)
    g.add_node("v", h=-1.0)
    g.add_node("w", h=2.0)
    g.add_edge("u", "v", J=0.25)
    g.add_edge("w", "v", J=-0.75)
    bm = BoltzmannMachine.from_networkx(g, bias="h", coupling="J", dtype=torch.float64)
    assert bm.variables == ["u", "v", "w"] and bm.bias.tolist() == [0.5, -1.0, 2.0]
    z = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    assert float(bm.energy(z).detach()) == pytest.approx(-(0.5 - 1.0 + 2.0) - (0.25 - 0.75))
    mapped = BoltzmannMachine.from_networkx(g, coupling={("v", "u"): 1.0, ("v", "w"): 2.0})
    assert sorted(mapped.coupling.tolist()) == [1.0, 2.0] and mapped.bias.abs().sum() == 0
    r1 = BoltzmannMachine.from_networkx(g, seed=3, init_std=0.5)
    r2 = BoltzmannMachine.from_networkx(g, seed=3, init_std=0.5)
    assert torch.equal(r1.coupling, r2.coupling)
    assert r1.coupling.abs().sum() > 0
    with pytest.raises(ValueError, match="no attribute 'J2'"):
        BoltzmannMachine.from_networkx(g, coupling="J2")


@pytest.mark.parametrize("masked", [False, True])
def test_from_rbm_same_energies_and_log_z(masked):
    mask = (torch.rand(5, 4, generator=torch.Generator().manual_seed(0)) < 0.6).float()
    rbm = RBM(5, 4, init_std=0.8, seed=2, mask=mask if masked else None)
    with torch.no_grad():
        rbm.visible_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        rbm.hidden_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    bm = from_rbm(rbm)
    assert bm.n_edges == (int(mask.sum()) if masked else 20)
    assert [c.tolist() for c in bm.colour_classes] == [list(range(5)), list(range(5, 9))]
    z = torch.bernoulli(torch.full((16, 9), 0.5), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(bm.energy(z), rbm.energy(z[:, :5], z[:, 5:]), atol=1e-6)
    assert exact_log_partition(bm) == pytest.approx(rbm_exact_log_partition(rbm), abs=1e-9)


def test_exact_log_z_sums_a_class_out_and_matches_brute_force():
    bm = cycle_with_chords()
    assert len(bm.colour_classes) >= 3  # odd cycles: not an RBM
    assert 2 ** (bm.n_units - len(bm.colour_classes[bm.summed_class()])) < 2**bm.n_units
    assert float(bm.log_partition()) == pytest.approx(brute_log_z(bm), abs=1e-9)
    log_p = bm.exact_log_probs()
    assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-12)
    z = enumerate_states(bm.n_units, 0, 2**bm.n_units, torch.float64)
    assert torch.allclose(log_p, -bm.energy(z) - brute_log_z(bm), atol=1e-9)
    with pytest.raises(ValueError, match="annealed importance sampling"):
        bm.log_partition(max_states=2**4)


def test_ais_agrees_with_exact_within_its_standard_error():
    g = nx.circulant_graph(16, [1, 2])  # triangles (0, 1, 2), ...: 4 colour classes here
    g.add_edges_from([(0, 5), (2, 9), (4, 13)])
    bm = BoltzmannMachine.from_networkx(g, init_std=1.0, seed=7, dtype=torch.float64)
    with torch.no_grad():
        bm.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
    assert len(bm.colour_classes) >= 3  # couplings among the enumerated units, too
    exact = exact_log_partition(bm)
    res = ais_log_partition(bm, num_betas=1000, num_runs=200, seed=0)
    assert 0 < res.log_z_std < 0.02  # a real, tight estimate, not a vacuous bound
    # seeds 0-3 measured: |error| 0.003-0.006 with a standard error of 0.005
    assert abs(res.log_z - exact) <= 4 * res.log_z_std + 0.005
    assert res.log_weights.shape == (200,) and 1 <= res.effective_sample_size <= 200
    assert log_partition(bm).method == "exact"
    est = log_partition(bm, exact_limit_units=2, num_betas=200, num_runs=20)
    assert est.method == "ais" and est.ais is not None


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_colour_class_conditional_matches_exact_enumeration(layout):
    """Given the rest, a class's units are independent with P = σ(local field): the joint
    conditional of the whole class, from exact enumeration, is the product of the per-unit
    conditionals (what block Gibbs draws)."""
    bm = cycle_with_chords(seed=1)
    n = bm.n_units
    z = enumerate_states(n, 0, 2**n, torch.float64)
    log_p = bm.exact_log_probs()
    gen = torch.Generator().manual_seed(0)
    for cls in bm.colour_classes:
        rows = bm.coupling_rows(cls, layout=layout)
        assert rows.is_sparse == (layout == "sparse")
        rest = torch.ones(n, dtype=torch.bool)
        rest[cls] = False
        for _ in range(3):
            r = torch.bernoulli(torch.full((n,), 0.5), generator=gen).double()
            match = (z[:, rest] == r[rest]).all(1)
            cond = torch.exp(log_p[match] - torch.logsumexp(log_p[match], 0))
            p = bm.p_unit_given_rest(r[None], cls, rows=rows)[0]
            zc = z[match][:, cls]
            product = (zc * p + (1 - zc) * (1 - p)).prod(1)
            assert torch.allclose(cond, product, atol=1e-10)


def test_gibbs_sweep_samples_the_model():
    bm = cycle_with_chords(n=12, seed=2)
    inside = [k for k, (i, j) in enumerate(bm.edges.tolist()) if i < 7 and j < 7]
    small = BoltzmannMachine(  # its first 7 units: 128 states, counted reliably
        7,
        bm.edges[inside],
        bias=bm.bias[:7].detach(),
        coupling=bm.coupling[inside].detach(),
        dtype=torch.float64,
    )
    assert len(small.colour_classes) >= 3
    gen = torch.Generator().manual_seed(0)
    z = small.gibbs_sweep(torch.zeros(20000, 7), num_sweeps=40, generator=gen)
    index = (z.long() << torch.arange(7)).sum(1)
    empirical = torch.bincount(index, minlength=128).double() / z.shape[0]
    tv = 0.5 * (empirical - small.exact_log_probs().exp()).abs().sum()
    assert tv < 0.04  # sampling noise alone: E[TV] ≈ 0.02 at 20,000 samples of 128 states


def test_local_field_dense_and_sparse_agree_and_pick_by_density():
    bm = qpu_native("pegasus", 4, shape=6, seed=0, scale=0.5)  # 680 qubits, 2 % dense
    cls = bm.colour_classes[0]
    assert bm.coupling_rows(cls).is_sparse  # a hardware graph is sparse
    assert not multipartite([8, 8, 8, 8], seed=0).coupling_rows(torch.arange(8)).is_sparse
    gen = torch.Generator().manual_seed(0)
    z = torch.bernoulli(torch.full((6, bm.n_units), 0.5), generator=gen)
    dense = bm.local_field(z, cls, layout="dense")
    assert torch.allclose(dense, bm.local_field(z, cls, layout="sparse"), atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        bm.coupling_rows(cls, layout="csr")


def hardware_edges(graph):
    return {frozenset(e) for e in graph.edges}


@pytest.mark.parametrize(
    "topology, shape, partitions, colours",
    [("pegasus", 2, 4, 4), ("pegasus", 2, 2, 2), ("chimera", 2, 2, 2), ("chimera", 2, 4, 4),
     ("zephyr", 1, 4, 4)],
)
def test_qpu_native_keeps_only_hardware_couplers_and_is_k_partite(
    topology, shape, partitions, colours
):
    import dwave.graphs

    hw = getattr(dwave.graphs, f"{topology}_graph")(shape)
    bm = qpu_native(topology, partitions, shape=shape, seed=0)
    assert set(bm.variables) <= set(hw.nodes)
    labels = bm.variables
    ours = {frozenset((labels[i], labels[j])) for i, j in bm.edges.tolist()}
    assert ours <= hardware_edges(hw)
    classes = bm.colour_classes
    assert len(classes) == colours
    assert (bm.colour[bm.edges[:, 0]] != bm.colour[bm.edges[:, 1]]).all()
    if partitions >= {"chimera": 2, "pegasus": 4, "zephyr": 4}[topology]:
        assert ours == hardware_edges(hw)  # a proper colouring keeps every coupler
    else:
        assert 0 < len(ours) < hw.number_of_edges()


def test_qpu_native_on_a_solver_graph_and_a_patch_of_qubits():
    from dwave.system.testing import MockDWaveSampler

    solver = MockDWaveSampler(topology_type="pegasus", topology_shape=[3])
    graph = solver.to_networkx_graph()
    graph.remove_node(next(iter(graph.nodes)))  # a missing qubit, as on real hardware
    bm = qpu_native(None, 4, graph=graph, qubits_per_partition=10, seed=1)
    assert [len(c) for c in bm.colour_classes] == [10, 10, 10, 10]
    labels = bm.variables
    ours = {frozenset((labels[i], labels[j])) for i, j in bm.edges.tolist()}
    assert ours <= hardware_edges(graph) and len(ours) > 40  # a compact, well-connected patch
    # its BQM is a subgraph of the solver: samplable natively, without chains
    bqm = bm.to_bqm(dimod.SPIN)
    assert set(bqm.variables) <= set(solver.nodelist)
    assert all(frozenset(e) in hardware_edges(graph) for e in bqm.quadratic)
    with pytest.raises(ValueError, match="partitions must be an int >= 2"):
        qpu_native("pegasus", 1, shape=2)
    with pytest.raises(ValueError, match="unknown topology"):
        qpu_native("hexagonal", 2, shape=2)
    with pytest.raises(ValueError, match="topology and its shape"):
        qpu_native("pegasus", 4)
    with pytest.raises(ValueError, match="only"):
        qpu_native("chimera", 2, shape=1, qubits_per_partition=5)


def test_float64_copy_is_detached_and_state_dict_round_trips():
    bm = multipartite([3, 2, 2], seed=0, scale=0.3)
    copy = bm.float64_copy()
    assert copy.bias.dtype == torch.float64 and copy.variables == bm.variables
    assert torch.equal(copy.colour, bm.colour)
    other = multipartite([3, 2, 2], seed=1)
    other.load_state_dict(bm.state_dict())
    assert torch.equal(other.coupling, bm.coupling)


def test_greedy_colouring_finds_pegasus_four_colours_and_serves_unknown_graphs():
    native = qpu_native("pegasus", 4, shape=6, seed=0)
    rebuilt = BoltzmannMachine.from_bqm(native.to_bqm())  # no parts: colours found greedily
    assert len(rebuilt.colour_classes) == 4  # Pegasus has K4s: 4 is the least
    assert (rebuilt.colour[rebuilt.edges[:, 0]] != rebuilt.colour[rebuilt.edges[:, 1]]).all()
    import dwave.graphs

    plain = nx.relabel_nodes(dwave.graphs.pegasus_graph(2), lambda q: f"q{q}")
    plain.graph.clear()  # no family: qpu_native falls back to the greedy colouring
    bm = qpu_native(None, 4, graph=plain, seed=0)
    assert bm.variables[0].startswith("q") and len(bm.colour_classes) == 4
    labels = bm.variables
    assert {frozenset((labels[i], labels[j])) for i, j in bm.edges.tolist()} <= hardware_edges(
        plain
    )
    assert (bm.colour[bm.edges[:, 0]] != bm.colour[bm.edges[:, 1]]).all()
