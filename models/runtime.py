"""Where training runs: device, precision, and torchrun's process group.

`train.py` works unchanged under `torchrun --nproc_per_node=N`: torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK, and this module joins the process group
(NCCL on CUDA, gloo on CPU). Only rank 0 writes files and prints.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: full precision
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def now(self) -> float:
        """Wall time after the device's queued work: timings count GPU work where it was asked for."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def wants_compile(self, setting: str) -> bool:
        """train.compile: auto compiles on CUDA only (on the CPU compiling costs more than it saves here)."""
        return setting == "true" or (setting == "auto" and self.device.type == "cuda")

    def describe(self) -> str:
        """The device in words, for the reproducibility record: "cuda NVIDIA H200 x 2 processes", "cpu x86_64"."""
        import platform
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.machine()
        procs = f" x {self.world_size} processes" if self.distributed else ""
        return f"{self.device.type} {name}{procs}"

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def gather(self, obj):
        """List of every rank's obj (a one-element list when not distributed)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(amp: str = "auto", channels_last: bool = True) -> Runtime:
    """amp: none | bf16 | fp16 | auto (CUDA only; the CPU always runs fp32)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    amp_dtype = None
    if device.type == "cuda" and amp != "none":
        if amp == "auto":  # bf16 where the GPU has it (Ampere and newer), else fp16 (Kaggle's P100/T4)
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Runtime(device=device, rank=rank, world_size=world_size, amp_dtype=amp_dtype,
                   channels_last=channels_last and device.type == "cuda")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
