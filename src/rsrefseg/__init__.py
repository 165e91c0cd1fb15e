"""rsrefseg: a Ray-distributed experiment platform for referring remote-sensing image segmentation."""

__version__ = "0.1.0"
