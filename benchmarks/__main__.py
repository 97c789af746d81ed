"""``python -m benchmarks``: run the benchmark suite and write ``benchmarks/RESULTS.md``."""

from __future__ import annotations

from benchmarks._runner import main

raise SystemExit(main())
