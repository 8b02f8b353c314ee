"""fedpeft: federated LoRA fine-tuning on Flower — FedIT, FFA-LoRA, FLoRA and LoRA-FAIR."""

__version__ = "0.1.0"
