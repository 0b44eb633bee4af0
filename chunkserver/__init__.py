"""chunkserver: a fast, crash-safe chunked upload server."""

from .config import Config, ConfigError, load_config
from .http.app import create_app

__all__ = ["Config", "ConfigError", "create_app", "load_config"]
__version__ = "0.1.0"
