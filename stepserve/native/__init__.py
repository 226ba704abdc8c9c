"""C sources of stepserve's CPU kernels, compiled once per machine by ``stepserve.models.cpu_native``."""
