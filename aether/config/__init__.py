"""The training configuration: its schema (`aether.config.schema`, light to import: what the model
reads), how a YAML file and overrides become one (`aether.config.load.load_config`), and the
reference code's schema in this project's terms (`aether.config.reference`)."""

from aether.config.schema import Config, validate_config

__all__ = ["Config", "validate_config"]
