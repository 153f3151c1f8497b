"""kiln's version, in a module of its own so that any part of kiln can read it without
importing the package's face (kiln/__init__.py imports the whole engine)."""

__version__ = "0.1.0"
