"""The FP8 checkpoint: gathering shards (``gather``), the writer under the source checkpoint's
names (``writer``) and the compressed-tensors config (``compressed_tensors``)."""
