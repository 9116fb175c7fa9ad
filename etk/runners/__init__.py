"""Runners: what the top-level Hydra entry points call."""
