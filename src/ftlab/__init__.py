"""ftlab: fine-tuning pretrained models with Lightning and Hydra."""

__version__ = "0.1.0"
