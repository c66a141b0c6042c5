"""qvae: variational autoencoders with an RBM prior and pluggable samplers."""

from qvae.rbm import RBM

__all__ = ["RBM"]
__version__ = "0.1.0"
