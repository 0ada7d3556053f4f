"""Where this process computes: the device, the process group under torchrun, and the seeds."""
import contextlib
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """This process's place in the run: one process (rank 0 of 1) or one of torchrun's."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """Rank 0 alone writes checkpoints, metrics, the submission, plots and progress bars."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] without torchrun)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def share_buffers(self, model):
        """Give every process rank 0's buffers (BatchNorm statistics), which DDP leaves apart
        after the last step: evaluation must see the model rank 0 saves."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def sum(self, tensor):
        """The sum of `tensor` over all ranks, on every rank."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


@contextlib.contextmanager
def runtime(use_gpu):
    """The Runtime of this process; under torchrun, a process group for the length of the block.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process.
    On CUDA each process takes the GPU of its local rank and talks over NCCL; otherwise gloo.
    """
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        yield Runtime(pick_device(use_gpu))
        return
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    if use_gpu and torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        dist.init_process_group('nccl', device_id=device)
    else:
        if use_gpu and rank == 0:
            print('warning: use_gpu=True but there is no CUDA device; the processes run on the CPU '
                  'over gloo', file=sys.stderr)
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    try:
        yield Runtime(device, rank, world_size)
    finally:
        dist.destroy_process_group()


def pick_device(use_gpu, announce=True):
    """CUDA, else Apple MPS, when asked for and present; the CPU otherwise, said once."""
    if use_gpu:
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest kernels
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        if announce:
            print('warning: use_gpu=True but this machine has no CUDA or MPS device; using the CPU '
                  '(--use_gpu=False silences this)', file=sys.stderr)
    return torch.device('cpu')


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def amp_dtype(device):
    """What --amp computes in: bf16, which keeps fp32's range, on CPUs and on GPUs from Ampere
    on; fp16 on older GPUs (which only emulate bf16), whose small gradients need a GradScaler."""
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def autocast(device, enabled):
    """Mixed precision for the forward pass (a no-op when not enabled)."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def grad_scaler(device, amp):
    """Scales the loss so that fp16 gradients do not underflow; disabled (a no-op) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)
