"""vlm: pretrain, fine-tune and evaluate vision-language models from shared, pluggable objectives."""

__version__ = "0.1.0"
