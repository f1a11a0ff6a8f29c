"""meshyard: one YAML job spec -> a distributed PyTorch training run."""

__version__ = "0.1.0"
