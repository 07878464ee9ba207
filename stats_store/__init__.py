"""The stats store: measured max-abs statistics in zarr, in global coordinates, with a shard map.

Modules: ``store`` (protocol, shared commit/reduce logic, in-memory store), ``layout`` (the zarr
store), ``shard_map``, ``metadata``, ``commit``, ``reduce`` (merge declarations), ``packing``
(one flat vector + index), ``shard_reduce`` (the reducer), ``gc_pause``, ``reshard``,
``inc_format`` (INC files), ``cli`` and ``plot``. Import what you need from those modules; this
package file stays empty so that importing one part does not load zarr or matplotlib.
"""
