"""What in a model gets measured: op types (``op_types``), module discovery and allow/block
rules (``discovery``, ``selection``) and the measurable attention ops attached to HF models
(``hf_attention``)."""
