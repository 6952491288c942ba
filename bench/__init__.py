"""Benchmarks: `make bench` (our stages against the stock TRL commands); results in bench/results/."""
