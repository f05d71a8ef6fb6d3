"""covjax: RL for reasoning language models with covariance-based entropy control."""

__version__ = "0.1.0"
