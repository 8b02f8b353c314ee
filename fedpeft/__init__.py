"""fedpeft: federated parameter-efficient fine-tuning on Flower; the aggregation rules live in ``strategies/``."""

__version__ = "0.1.0"
