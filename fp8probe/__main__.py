"""`python -m fp8probe` runs the CLI."""
from fp8probe.cli import main

main()
