"""Local training: one client's loop, and the batched kernel that trains several clients in one pass."""
