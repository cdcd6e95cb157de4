"""Several processes filling one store: torch.distributed under torchrun, or explicit --rank/--world-size.

Under `torchrun --nproc-per-node N -m diffprobe extract ...` every process reads RANK, WORLD_SIZE
and LOCAL_RANK from the environment, joins one process group (NCCL on GPUs, gloo on CPUs), runs
on cuda:LOCAL_RANK (see precision.resolve_device), and takes chunks rank, rank + N, ... of the
store. Rank 0 creates the store while the others wait at a barrier; a barrier at the end lets
every rank check that the store is complete. Multi-node works the same on a shared filesystem:
chunks are disjoint, and each chunk's "done" byte is written only after its rows are flushed.
Without torchrun, --rank/--world-size let independent jobs (a cluster array) share a store.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DiffprobeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    group: bool  # a torch.distributed process group joins the ranks (barriers work)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a small picklable value, e.g. the best sweep cell)."""
        if not self.group:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ)


def backend_for(requested: str, device: torch.device | None) -> str:
    """`auto`: NCCL on GPUs, gloo on CPUs, and gloo where this node runs more ranks than it has GPUs:
    NCCL refuses two ranks on one device (a GPU shared by 2 processes, as benchmarks/gpu_check.py runs)."""
    if requested != "auto":
        return requested
    if device is None or device.type != "cuda":
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local > torch.cuda.device_count():
        log.info("%d ranks on %d GPU(s): gloo, since NCCL refuses two ranks on one device", local, torch.cuda.device_count())
        return "gloo"
    return "nccl"


def ranks_per_device(device: torch.device) -> int:
    """How many ranks of the process group share this GPU (they divide its memory); 1 off torchrun
    or on a CPU. Counted by the GPU's UUID across ranks (a collective: every rank calls it), since a
    launcher may give each rank its own CUDA_VISIBLE_DEVICES, which hides how many share one."""
    if device.type != "cuda" or not dist.is_initialized():
        return 1
    mine = str(torch.cuda.get_device_properties(device).uuid)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone.count(mine)


def join(backend: str = "auto", device: torch.device | None = None) -> None:
    """Join torchrun's process group once (no-op outside torchrun, or when already joined)."""
    if dist.is_initialized() or not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU is the current one: pinned copies, events and NCCL's objects go there
    backend = backend_for(backend, device)
    if backend == "nccl" and not torch.cuda.is_available():
        raise DiffprobeError("the NCCL backend needs CUDA GPUs and none is visible here: use --dist-backend gloo (CPU)")
    if backend not in ("nccl", "gloo"):
        raise DiffprobeError(f"distributed backend {backend!r}: expected auto, nccl or gloo")
    kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
    # A long timeout: rank 0 may spend minutes creating a store or unpacking an archive first.
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60), **kwargs)
    log.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)


def ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """This process's share: from the process group when there is one (an explicit --rank or
    --world-size that disagrees is an error), else from the arguments or $RANK/$WORLD_SIZE."""
    if dist.is_initialized():
        actual = Ranks(dist.get_rank(), dist.get_world_size(), True)
        given = {"--rank": (rank, actual.rank), "--world-size": (world_size, actual.world_size)}
        wrong = [f"{flag} {g} (torchrun says {a})" for flag, (g, a) in given.items() if g is not None and g != a]
        if wrong:
            raise DiffprobeError(f"{', '.join(wrong)}: under torchrun the ranks come from the launcher; drop these flags")
        return actual
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise DiffprobeError(f"rank {rank} is not in [0, {world_size}): expected 0 ≤ --rank < --world-size")
    return Ranks(rank, world_size, False)
