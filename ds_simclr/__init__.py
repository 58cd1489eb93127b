"""ds_simclr: DeepSpeed-backed, large-batch SimCLR pretraining for 3D MRI."""

__version__ = "0.1.0"
