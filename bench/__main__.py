"""``python -m bench``: the serving benchmark (see bench/serving.py and docs/benchmarks.md)."""
import sys

from bench.serving import main

if __name__ == "__main__":
    main()
    sys.exit(0)
