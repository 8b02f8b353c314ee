"""Uplink compression of client updates (ComPEFT: sparsify, ternarise, pack)."""
