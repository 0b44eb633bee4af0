"""chunkserver: a fast, crash-safe chunked upload server."""

from .app import create_app
from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "create_app", "load_config"]
__version__ = "0.1.0"
