"""Developer tools: fuzzing, soak and connection-scale runs (not installed)."""
