"""FP8 numerics and scale math: formats and the saturating cast (``numerics``), the scale
formulas of every method (``scale_math``), the scale-method table INC configs name (``methods``),
one module's scales (``module_scales``) and the MSE search of the OPT methods (``opt_search``,
``opt_tables``)."""
