"""Latent Thought Models with fused kernels for the inner loop. Public API: docs/model.md, 'Public API'."""

from ltm.backends import BACKENDS, BackendUnavailableError, backend_status
from ltm.config import PRESETS, LTMConfig
from ltm.model import LTMDecoder
from ltm.posterior import Posterior

__all__ = ["BACKENDS", "PRESETS", "BackendUnavailableError", "LTMConfig", "LTMDecoder", "Posterior", "backend_status"]
