"""Data preparation for illmrec: datasets (prepare) and item features (features)."""
