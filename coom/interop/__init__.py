"""Checkpoint conversion to and from other frameworks\x27 layouts."""
