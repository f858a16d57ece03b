"""Notebook widgets over an AttributionSession."""
