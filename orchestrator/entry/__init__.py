"""Entry points: the ``fp8-calibrate`` CLI (``fp8_calibrate``), the ``stats-store`` inspection CLI
(``stats_store_cli``, ``stats_store_tables``), the demo (``demo``, ``demo_model``) and the shipped
SmolLM2 model (``smollm2``)."""
