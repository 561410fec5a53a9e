"""What a prediction gives back: `reconstruct` for one request (`api`), the records and their
scores, output names, the files and the report, and the callback that writes them in `predict`."""

__all__ = []  # nothing re-exported: import the module that holds a name
