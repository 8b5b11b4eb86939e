"""kanc.runtime (see design.md section 2)."""
