"""The FP8 checkpoint: gathering shards (``gather``, ``source``), the writer under the source
checkpoint's names (``writer``), the compressed-tensors layout (``compressed_tensors``) in
safetensors files written one tensor at a time (``safetensors_files``), and the streamed export of a
sharded run (``streamed``)."""
