"""Importers of checkpoints written by other code."""
