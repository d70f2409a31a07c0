"""Importers of released checkpoints (Hugging Face FLAVA: ``vlm.convert.hf_flava.flava_from_hf``; OpenFlamingo's
resampler and gated cross-attention: ``vlm.convert.open_flamingo.convert_open_flamingo_state``)."""
