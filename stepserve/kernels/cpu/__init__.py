"""stepserve's CPU kernels in C (``native``), compiled once per machine."""
