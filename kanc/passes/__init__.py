"""kanc.passes (see design.md section 2)."""
