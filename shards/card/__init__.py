"""One card: the Ray actor that owns a shard and writes its chunk of the stats store
(``actor``), the shard it runs (``runner``), its calibration steps (``calibration``) and the
one-line errors it reports (``actor_errors``)."""
