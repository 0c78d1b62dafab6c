"""One run on K processes (torchrun): each rank takes its slice of the one seeded meta-batch.

Every rank samples the same batch (the samplers share their seed) and works
on the slice `part(n)` of its n items (tasks, or images for a classifier).
Its algorithm computes the mean gradient of its slice; `average` weights it
by the slice's share of the batch and sums it over the ranks with one
all-reduce of one flat buffer, so every rank holds the batch's mean gradient
and takes the same outer step: K processes train the model one process
trains, to the order of floating-point sums. Rank 0 alone writes the run
folder. The process group is torch.distributed's, set up from the variables
torchrun gives each process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
"""

import atexit
import contextlib
import datetime
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from metalearn.device import share_cores
from metalearn.errors import MetalearnError

DEFAULT_TIMEOUT_S = 300  # how long a rank waits for the others before the run stops with an error


@dataclass
class Ranks:
    """This process's place among the run's processes; one process: rank 0 of 1, and every method a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    share: float = field(default=1.0, repr=False)  # this rank's fraction of the current batch

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def part(self, count: int) -> slice:
        """This rank's contiguous slice of `count` items (the first ranks take one more when uneven)."""
        return slice(count * self.rank // self.world, count * (self.rank + 1) // self.world)

    def split(self, batch: NamedTuple, what: str = "train.meta_batch_size") -> NamedTuple:
        """This rank's slice of a batch (every field sliced along its first dimension); sets `share`."""
        count = len(batch[0])
        if count < self.world:
            raise MetalearnError(
                f"{what}={count} cannot be split across {self.world} processes: each needs at least one item. "
                f"Set {what} to at least {self.world} (a multiple of {self.world} shares the work evenly)."
            )
        part = self.part(count)
        self.share = (part.stop - part.start) / count
        return type(batch)(*(item[part] for item in batch))

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: each rank's tensors (means over its slice) become the means over the whole batch."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]) * self.share
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients an optimizer is about to apply, averaged over the batch (one all-reduce)."""
        self.average([p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None])

    def batch_result(self, result: dict, stop: bool, time_up: bool = False) -> tuple:
        """A step's loss and accuracy over the whole batch, whether any rank was asked to stop (a signal), and
        whether any rank's time budget is spent."""
        if not self.active:
            return result, stop, time_up
        values = torch.tensor(
            [result["loss"] * self.share, result["accuracy"] * self.share, float(stop), float(time_up)],
            dtype=torch.float64,
        )
        dist.all_reduce(values)
        merged = {**result, "loss": values[0].item(), "accuracy": values[1].item()}
        return merged, bool(values[2].item() > 0), bool(values[3].item() > 0)

    def gather(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """Per-item values of `count` items, each rank holding those of `part(count)`: all of them, in order."""
        if not self.active:
            return values
        size = -(-count // self.world)  # the largest part
        padded = torch.zeros(size, dtype=values.dtype)
        padded[: len(values)] = values.cpu()
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)
        parts = [Ranks(r, self.world).part(count) for r in range(self.world)]
        return torch.cat([piece[: p.stop - p.start] for piece, p in zip(pieces, parts, strict=False)])

    def broadcast(self, value):
        """Rank 0's value (a picklable object) on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_threads(self, device: torch.device) -> int:
        """On a CPU the processes of one machine split its cores (each takes cores / local processes)."""
        if self.active and device.type == "cpu":
            return share_cores(self.local_world)
        return torch.get_num_threads()

    def device(self, device: torch.device) -> torch.device:
        """On CUDA, this rank's GPU (LOCAL_RANK); a CPU is shared."""
        if device.type != "cuda" or not self.active:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise MetalearnError(
                f"rank {self.rank} is local rank {self.local_rank}, but this machine has "
                f"{torch.cuda.device_count()} GPUs: start at most that many processes per machine."
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)


class _SumOverRanks(torch.autograd.Function):
    """y = the sum over the ranks of each rank's x. Each rank's loss is weighted by its share of the batch
    afterwards (Ranks.average), so the gradient reaching x is the share-weighted sum of the ranks' gradients
    at y, divided by this rank's share."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, ranks: "Ranks") -> torch.Tensor:
        ctx.ranks = ranks
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        share = ctx.ranks.share
        total = grad * share
        dist.all_reduce(total)
        return total / share, None


def sum_over_ranks(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over the ranks, differentiable (e.g. BatchNorm statistics of a batch split across ranks)."""
    return _SumOverRanks.apply(tensor, ranks) if ranks.active else tensor


SINGLE = Ranks()


def from_environment() -> Ranks:
    """This process's ranks from torchrun's variables, or from a submitit job's tasks (SLURM,
    hydra.launcher.tasks_per_node > 1); one process when there are neither."""
    if "WORLD_SIZE" not in os.environ:
        _export_job_tasks()
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return SINGLE
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise MetalearnError(
            f"RANK={rank} is not one of 0..{world - 1} (WORLD_SIZE={world}): each of the WORLD_SIZE processes of "
            f"a run needs its own RANK. Start them with torchrun, which sets RANK, or check the variables you set."
        )
    return Ranks(
        rank=rank,
        world=world,
        local_rank=_env_int("LOCAL_RANK", "0"),
        local_world=_env_int("LOCAL_WORLD_SIZE", str(world)),
    )


def _env_int(name: str, default: str | None = None) -> int:
    """A whole-number variable of torchrun's (RANK, WORLD_SIZE, ...), or one line that says what is wrong."""
    value = os.environ.get(name, default)
    if value is None:
        raise MetalearnError(
            f"{name} is not set, but WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for a run on several processes: "
            f"start them with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or set them all."
        )
    try:
        return int(value)
    except ValueError:
        raise MetalearnError(
            f"{name}={value!r} is not a whole number: set it as torchrun would (RANK and LOCAL_RANK count from 0, "
            f"WORLD_SIZE and LOCAL_WORLD_SIZE are numbers of processes), or start the processes with torchrun."
        ) from None


def _export_job_tasks() -> None:
    """In a submitit job of several tasks, torchrun's variables from the job's (submitit's own helper)."""
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not in a submitit job
        return
    except ValueError as err:
        raise MetalearnError(_job_variables_message(err)) from None
    if tasks <= 1:
        return
    # A job script's own rendezvous address wins (submitit itself reads MASTER_PORT); the rest is the job's.
    preset = {name: os.environ[name] for name in ("MASTER_ADDR", "MASTER_PORT") if name in os.environ}
    try:
        # GPUs stay visible: a rank takes the one of its local rank (Ranks.device).
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    except Exception as err:  # it only reads the job's variables: a bad one (a SLURM_JOB_NODELIST it cannot parse)
        raise MetalearnError(_job_variables_message(err)) from None
    os.environ.update(preset)


def _job_variables_message(err: BaseException) -> str:
    return (
        f"this SLURM job's tasks could not be read from its SLURM_* variables ({_first_line(err)}): check "
        f"SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST, or start the "
        f"processes with torchrun."
    )


def _rendezvous_address() -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT, where rank 0 waits for the others; checked before anything waits on them."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise MetalearnError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the processes of this run "
            f"cannot find each other: set MASTER_ADDR to rank 0's machine and MASTER_PORT to a free port on it, the "
            f"same for every process (torchrun sets both)."
        )
    port = os.environ["MASTER_PORT"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise MetalearnError(f"MASTER_PORT={port!r} is not a port: choose a free one from 1024 to 65535.")
    return os.environ["MASTER_ADDR"], int(port)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")


def rendezvous_failed_message(err: BaseException, ranks: Ranks, address: tuple[str, int], timeout_s: float) -> str:
    """What a rank says when the processes of a run could not meet: which rendezvous, and what to check."""
    host, port = address
    where = f"rank {ranks.rank} of {ranks.world} could not meet the others at MASTER_ADDR:MASTER_PORT={host}:{port}"
    why = _first_line(err)
    if "address already in use" in why.lower() or "EADDRINUSE" in why:
        what = f"port {port} is taken by another program ({why}). Choose a free MASTER_PORT, the same for every process"
    elif ranks.main:
        what = (
            f"not all {ranks.world} processes joined within device.dist_timeout_s={timeout_s:g} s ({why}). Check that "
            f"every one was started, each with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE and its own RANK, and "
            f"that they can reach this machine on port {port}"
        )
    else:
        what = (
            f"rank 0 did not answer within device.dist_timeout_s={timeout_s:g} s ({why}). Check that rank 0 was "
            f"started, that MASTER_ADDR names its machine and is reachable from this one, and that MASTER_PORT is the "
            f"same for every process"
        )
    in_slurm_job = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    job = " (in a SLURM job MASTER_ADDR is the first node of SLURM_JOB_NODELIST)" if in_slurm_job else ""
    return f"{where}: {what}{job}."


@contextlib.contextmanager
def _native_stderr_held():
    """torch's C++ side logs each failed try of a rendezvous to file descriptor 2, with a stack of frames: held
    back, and written out only if the rendezvous succeeds (a failure is said in one line instead)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                held.seek(0)
                text = held.read()
                while text:
                    text = text[os.write(2, text) :]


def start(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun's variables describe: gloo for CPU tensors, and for a run on GPUs
    nccl for CUDA ones, each process on the GPU of its local rank."""
    ranks = from_environment()
    if ranks.active and not dist.is_initialized():
        address = _rendezvous_address()
        backend = "gloo"
        if device.type == "cuda":
            ranks.device(device)  # before the group exists: its first collective runs on this GPU
            backend = "cpu:gloo,cuda:nccl"
        try:
            with _native_stderr_held():
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:  # torch's DistError is a RuntimeError
            raise MetalearnError(rendezvous_failed_message(err, ranks, address, timeout_s)) from None
        # Left to interpreter shutdown, the group's threads can end the process with std::terminate (SIGABRT).
        atexit.register(_leave_group)
    return ranks


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """The end of a command on several processes: each rank waits for the others (rank 0 may still be
    writing the run's last files), all leave the group while every one is alive, and a rank other than 0,
    which writes nothing, then exits at once. Left to the end of the interpreter, the group's native
    threads now and then ended a finished rank with std::terminate (SIGABRT), and torchrun reported the
    run as failed."""
    if not dist.is_initialized():
        return
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    try:
        dist.barrier()
    except RuntimeError as err:  # another rank stopped first, with its own error
        raise MetalearnError(lost_rank_message(err, ranks)) from None
    dist.destroy_process_group()
    if not ranks.main:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def leave_log_to_rank_0() -> None:
    """A rank other than 0 writes no log file (in a launcher's job Hydra gave every task the run's log)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def lost_rank_message(err: BaseException, ranks: Ranks) -> str:
    """What a rank says when a collective fails: another rank stopped or hung."""
    return (
        f"rank {ranks.rank} of {ranks.world} lost the other processes ({str(err).splitlines()[0][:200]}): one of "
        f"them stopped or did not answer within the timeout. The run folder keeps its last checkpoint: resume it "
        f"with the same torchrun command plus resume=<run folder> (any number of processes)."
    )


def lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank is gone (closed connection) or silent (timeout)."""
    backend_error = getattr(dist, "DistBackendError", ())
    signs = ("Connection closed", "Connection reset", "Broken pipe", "timed out", "Timed out", "timeout")
    return isinstance(err, backend_error) or any(sign in str(err) for sign in signs)
