"""MEASURE: observers (``observers``), the measuring session that attaches them and collects
statistics (``session``), and per-expert token counts of MoE layers (``expert_coverage``)."""
