"""Analyses behind the walkthrough notebooks (no training needed): assignment statistics, ..."""
