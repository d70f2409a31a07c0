"""The batch fields every part of vlm agrees on (names follow Hugging Face where one exists).

A *sample* is a dict produced by a dataset + transform; a *batch* is what ``collate`` makes of a list of
samples, plus the fields the multi-stream DataModule adds. Objectives name the fields they need
(``Objective.requires_fields``); models read only these names.
"""

FIELDS: dict[str, str] = {
    # added by the DataModule
    "stream": "str: name of the data stream this batch came from",
    "batch_index": "int: position of this batch in the schedule (global over streams; seeds per-step randomness)",
    "num_skipped": "int: corrupt/missing samples skipped while this batch was assembled",
    # images
    "pixel_values": "float[B,3,H,W] normalised image (FLAVA, PaLI) or float[B,T,3,H,W] for T images per sample (Flamingo)",
    "image_mask": "bool[B,T]: which of the T image slots hold a real image (interleaved documents)",
    # text
    "input_ids": "long[B,L] token ids (encoder input for FLAVA/PaLI; the whole interleaved sequence for Flamingo)",
    "attention_mask": "long[B,L] 1 = real token, 0 = padding",
    "token_type_ids": "long[B,L] optional segment ids (BERT-style text encoders)",
    "labels": "long[B,T] LM targets, -100 = no loss (captioning LM loss); decoder targets for encoder-decoder models",
    "decoder_attention_mask": "long[B,T] 1 = real target token (encoder-decoder models)",
    # optional precomputed masks/targets (otherwise the model masks on the fly, seeded per step)
    "input_ids_masked": "long[B,L] text with MLM/MMM masking applied",
    "mlm_labels": "long[B,L] original ids at masked positions, -100 elsewhere",
    "bool_masked_pos": "bool[B,N] masked image patches",
    "mim_labels": "long[B,N] image-tokenizer ids at masked patches, -100 elsewhere",
    "itm_labels": "long[B] 1 = image and text match, 0 = mismatched pair placed in the batch by the data",
    # evaluation
    "pair_id": "long[B] id of the underlying image: texts and images with equal pair_id match (retrieval)",
    "class_index": "long[B] class of the image (zero-shot classification); -1 = no class, left out of accuracy",
    "text": "list[str] the raw text (for logging predictions)",
    "target_text": "list[str] reference answers/captions (for generation metrics)",
}

#: padding value used by ``collate`` when samples of a field differ in length
PAD_VALUES: dict[str, int | float | bool] = {
    "labels": -100,
    "mlm_labels": -100,
    "mim_labels": -100,
    "attention_mask": 0,
    "decoder_attention_mask": 0,
    "image_mask": False,
}
