"""The settings tree's shared parts: a group built from any spelling (`tree`) and the one module that
maps the earlier flat names of configs, command lines and stored files to the tree (`old_keys`)."""

__all__ = []  # nothing re-exported: import the module that holds a name
