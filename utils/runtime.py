"""Where this process computes: the device, and the seeds that make runs repeatable."""
import random
import sys

import torch


def pick_device(use_gpu):
    """CUDA, else Apple MPS, when asked for and present; the CPU otherwise, said once."""
    if use_gpu:
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest kernels
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        print('warning: use_gpu=True but this machine has no CUDA or MPS device; using the CPU '
              '(--use_gpu=False silences this)', file=sys.stderr)
    return torch.device('cpu')


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def autocast(device, enabled):
    """Mixed precision for the forward pass: fp16 on CUDA (with a GradScaler), bf16 elsewhere."""
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)
