"""The server loop: rounds, evaluation, checkpoints and the metrics row, over any Flower grid."""
