"""The adapter folder of a `Reconstructor`: its files (`files`), its manifest (`manifest`) and a
bank of adapters swapped by class (`bank`)."""

__all__ = []  # nothing re-exported: import the module that holds a name
