"""The distributed run: the driver (``calibration``, ``measure_loop``), the Ray grid of card
actors with placement groups and restarts (``grid``, ``cluster_provider``), the run's store and
identity (``run_store``, ``run_identity``, ``module_fingerprint``), calibration data (``data``),
coverage of MoE experts (``coverage``), the global scales (``global_scales``) and progress bars
(``progress``)."""
