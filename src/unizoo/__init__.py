"""unizoo: a zoo of interchangeable components for unified multimodal models."""
__version__ = "0.1.0"
