"""What a prediction gives back: `reconstruct` for one request (`api`), the records and their
scores (`records`), the files (`outputs`, `files`), the tables and the report, and the callback
that writes them in `predict` (`writer`)."""

__all__ = []  # nothing re-exported: import the module that holds a name
