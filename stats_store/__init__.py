"""The stats store, the bottom layer (data only; imports neither ``shards`` nor ``orchestrator``):
measured max-abs statistics in zarr, in global coordinates, with a shard map.

Modules: ``records`` (measurements), ``store`` (protocol, shared commit/reduce logic, in-memory
store), ``zarr_store`` (the zarr store), ``location`` (where a store lives: path, file:// or s3://),
``store_io`` (zarr's store and whole-object I/O for a location), ``remote_errors`` (s3 retries,
timeouts and error messages), ``shard_map``, ``metadata``, ``commit``, ``atomic``
(atomic file writes), ``reduce`` (merge declarations), ``packing`` (one flat vector + index),
``shard_reduce`` (the reducer), ``gc_pause``, ``reshard``, INC files (``inc_ops``, ``inc_names``,
``inc_layout``, ``inc_read``, ``inc_unify``, ``inc_write``, ``inc_experts``), ``errors`` and
``plot``. Import what you need from those modules; this package file stays empty so that
importing one part does not load zarr or matplotlib.
"""
