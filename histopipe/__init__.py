"""histopipe: whole-slide images to annotated synthetic histopathology data."""

__version__ = "0.1.0"
