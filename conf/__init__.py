"""Hydra configs, shipped as package data: Hydra reads them by package (``pkg://fedpeft.conf``)."""
