"""The config schema: typed dataclasses for every Hydra group, and their validation."""
