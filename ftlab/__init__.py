"""ftlab: Hydra-composed fine-tuning experiments on PaddlePaddle / PaddleNLP."""

__version__ = "0.1.0"
