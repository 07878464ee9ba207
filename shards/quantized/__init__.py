"""QUANTIZE: the patched modules (``modules``), the device backends that cast and multiply
(``backends``), swapping a model's modules for them (``swap``) and the shared input QDQ
(``qdq_memo``)."""
