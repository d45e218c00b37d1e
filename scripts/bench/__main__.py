"""`python -m scripts.bench`: see docs/benchmarks.md."""

import sys

from scripts.bench.run import main

sys.exit(main())
