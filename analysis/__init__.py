"""Analysis: paper tables, figures and statistics, computed from results tables (never a model)."""
