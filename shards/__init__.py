"""One card: everything a single shard computes, importing only ``stats_store`` below it.

Rooms: ``fp8`` (FP8 numerics and scale math), ``model`` (op types, discovery, HF attention ops),
``families`` (the model-family registry), ``tp`` (tensor-parallel rules, layers, checkpoint
slicing, process groups), ``measuring`` (observers and the measuring session), ``quantized``
(patched modules, device backends, module swapping) and ``card`` (the Ray actor that owns a shard
and writes its chunk of the stats store). ``plan`` is the run plan the shards receive, ``errors``
the package's errors.
"""
