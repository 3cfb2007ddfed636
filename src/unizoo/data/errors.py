"""The error for data that cannot be trained on at all (kept free of heavy imports: the CLI catches it)."""


class DataError(ValueError):
    """No listing, no readable image, an empty split: one paragraph naming the path and the layout; CLI exit 2."""
