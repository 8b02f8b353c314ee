"""What a run writes: metrics rows, plots, partition and node status tables."""
