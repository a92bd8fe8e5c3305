"""Model factories for the report screenshots (`fp8probe analyze benchmarks/models/<file>.py:build`)."""
