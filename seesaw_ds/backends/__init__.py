"""The only package that imports DeepSpeed (see its modules). On a machine without a CUDA device, DeepSpeed's
accelerator is named before its first import (``DS_ACCELERATOR=cpu``, unless the user set it): left to detect
it, DeepSpeed picks the same CPU accelerator but warns every rank that it "was unable to detect" a GPU."""
import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
