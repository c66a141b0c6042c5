"""Pluggable samplers for an RBM prior: exact, gibbs, neal, dwave, langevin, mala, remote, dimod.

>>> import backends, qvae
>>> rbm = qvae.RBM(6, 4, seed=0)
>>> out = backends.get_sampler("exact").sample(rbm, num_samples=5, seed=0)
>>> tuple(out.visible.shape), tuple(out.hidden.shape), tuple(out.energy.shape)
((5, 6), (5, 4), (5,))
"""

from backends.base import Sampler, SampleSet
from backends.ocean import as_dimod
from backends.registry import availability, available, get_sampler, register, registered

__all__ = [
    "SampleSet",
    "Sampler",
    "as_dimod",
    "availability",
    "available",
    "get_sampler",
    "register",
    "registered",
]
