"""Files read and written safely: write-then-rename (`atomic`) and weight files (`weights`)."""

__all__ = []  # nothing re-exported: import the module that holds a name
