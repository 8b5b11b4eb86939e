"""kanc.frontend (see design.md section 2)."""
