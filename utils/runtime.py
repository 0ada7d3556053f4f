"""Where this process computes: the device, the process group under torchrun, and the seeds."""

import contextlib
import functools
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
    dtype: torch.dtype | None = None  # what forward passes compute in: None (fp32), bf16 or fp16
    layout: torch.memory_format = torch.contiguous_format  # of the model and its input batches

    def autocast(self):
        """Mixed precision in self.dtype for a forward pass; a no-op in fp32."""
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """Scales the loss so that fp16 gradients do not underflow; disabled (a no-op) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @property
    def precision(self):
        return {None: 'fp32', torch.bfloat16: 'bf16 mixed precision', torch.float16: 'fp16 mixed precision'}[self.dtype]

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

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (just `obj` without torchrun)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_buffers(self, model):
        """Give every process rank 0's buffers (BatchNorm statistics), which DDP leaves apart
        after the last step: evaluation must see the model rank 0 saves."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def sum(self, tensor):  # over all ranks, on every rank
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def runtime_of(cfg):
    """runtime() as the options say; a missing GPU is said only where --use_gpu=True was given."""
    return runtime(cfg.use_gpu, cfg.amp, cfg.channels_last, announce='use_gpu' in cfg.given)


@contextlib.contextmanager
def runtime(use_gpu, amp='False', channels_last=False, announce=False):
    """The Runtime of this process; under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set), a process
    group (NCCL on CUDA, else gloo) for the length of the block. A group made by an outer block
    (a sweep's, held across its trials) is used and left standing: torch names every default
    group alike, so a second one in the same processes would not connect."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        device = pick_device(use_gpu, announce)
        yield Runtime(device, dtype=compute_dtype(device, amp), layout=layout)
        return
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    owner = not dist.is_initialized()
    if use_gpu and torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        if owner:
            dist.init_process_group('nccl', device_id=device)
    else:
        if use_gpu and announce and rank == 0 and owner:
            print(
                'warning: use_gpu=True but there is no CUDA device; the processes run on the CPU over gloo',
                file=sys.stderr,
            )
        device = torch.device('cpu')
        if owner:
            dist.init_process_group('gloo')
    try:
        yield Runtime(device, rank, world_size, compute_dtype(device, amp), layout)
    finally:
        if owner:
            dist.destroy_process_group()


def pick_device(use_gpu, announce=False):
    """CUDA, else Apple MPS, when asked for and present; the CPU otherwise, said once."""
    if use_gpu:
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed image size: let cuDNN pick its fastest kernels
            return torch.device('cuda')
        if torch.backends.mps.is_available():
            return torch.device('mps')
        if announce:
            print(
                'warning: use_gpu=True but this machine has no CUDA or MPS device; using the CPU '
                '(--use_gpu=False silences this)',
                file=sys.stderr,
            )
    return torch.device('cpu')


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed % 2**64)  # also seeds CUDA; a seed made of the run's, an epoch's and more may be larger


def amp_dtype(device):
    """What --amp computes in: bf16, which keeps fp32's range, on GPUs from Ampere on and on CPUs
    with bf16 instructions; fp16 on older GPUs (which only emulate bf16), whose small gradients
    need a GradScaler; None (fp32) on other CPUs, where emulated bf16 is slower than fp32."""
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    if device.type == 'cpu' and not cpu_has_bf16():
        return None
    return torch.bfloat16


def cpu_has_bf16():
    """x86's AVX512-BF16 or AMX (AMD from Zen 4 on, Xeons of Cooper Lake and from Sapphire Rapids
    on), as torch detects them. That is private API: should a release rename it, this raises
    (AttributeError) instead of quietly computing in fp32 ever after."""
    return any([torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()])


def compute_dtype(device, amp):
    """What forward passes compute in: None (fp32), torch.bfloat16 or torch.float16. --amp=auto:
    bf16 where the GPU or CPU computes it natively, else fp32, never fp16; True: amp_dtype()."""
    mode = str(amp).lower()
    if mode == 'false':
        return None
    if mode == 'auto':
        native = device.type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native or device.type == 'cpu' and cpu_has_bf16() else None
    dtype = amp_dtype(device)
    if dtype is None:
        _warn_once(
            'warning: --amp: this CPU has no bf16 instructions (AVX512-BF16 or AMX), and '
            'bf16 would be slower than fp32 here: computing in fp32'
        )
    return dtype


@functools.cache
def _warn_once(message):
    print(message, file=sys.stderr)
