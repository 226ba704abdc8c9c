"""Benchmarks: offline throughput, online serving, side by side with peers. Figures, never tests."""
