"""Datasets: reading, partitioning and encoding client data; instruction-tuning formats."""
