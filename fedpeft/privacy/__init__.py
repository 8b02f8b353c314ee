"""Privacy: DP-SGD accounting (what a client's training spends) and the audit of a finished run's model."""
