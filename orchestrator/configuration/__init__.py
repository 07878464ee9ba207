"""The INC-style JSON config: the pydantic model (``fp8_config``), its fields and enums
(``fields``) and the hints of its error messages (``hints``)."""
