"""GPT-FL shared core: wire serde, weight streaming, config, PKI/TLS, model zoo, datasets."""

__version__ = "0.1.0"
