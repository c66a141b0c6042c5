"""The qvae sampler service (`qvae serve`): every backend behind one authenticated HTTP API."""

from qvae.service.app import create_app
from qvae.service.settings import ServiceConfig, load_service_config

__all__ = ["ServiceConfig", "create_app", "load_service_config"]
