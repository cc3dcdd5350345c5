"""`python -m flashinfer_jit ...` is the `flashinfer-jit` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
