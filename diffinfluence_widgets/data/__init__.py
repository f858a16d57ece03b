"""Data: bundled digits, image folders, torch datasets, thumbnails."""
