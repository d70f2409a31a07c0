"""Importers of released checkpoints (Hugging Face FLAVA: ``vlm.convert.hf_flava.flava_from_hf``)."""
