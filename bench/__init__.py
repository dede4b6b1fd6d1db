"""Speed and accuracy benchmarks (results in RESULTS.md). Each runs as `python bench/<name>.py` from a checkout;
they import each other, and the tests import them, as `bench.<name>` only."""
