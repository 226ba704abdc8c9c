"""The version, importable without the package's lazy offline API (which loads the engine)."""

__version__ = "0.1.0"
