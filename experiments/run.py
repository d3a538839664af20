#!/usr/bin/env python
"""scr-jax command line, the documented entry: `python experiments/run.py CMD ...`.

The CLI itself is `scr_jax/cli.py` (also installed as the `scr-jax` command).
"""
from scr_jax.cli import main

if __name__ == "__main__":
  main()
