"""Run an evaluation under ``torchrun`` with several processes and get exactly the single-process numbers.

The recipe every evaluation follows (see :func:`cubistmerge.eval.imagenet.evaluate_imagenet`):

1. ``env = init_distributed(device)``: reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (set by torchrun),
   initialises the default process group (``nccl`` for CUDA, else ``gloo``) when there are several
   processes and nobody has done it yet; a plain ``python`` run is a world of one and needs nothing;
2. ``device = resolve_device(device, env)``: a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``;
3. each process takes the work items ``i`` with ``i % world_size == rank`` (:func:`shard`,
   :func:`shard_indices`, :class:`ShardSampler`). Nothing is padded, unlike ``DistributedSampler``,
   which repeats items so that every rank gets as many: those duplicates would be counted twice;
4. each process makes one record per item (or per instance) carrying the item's global position;
5. :func:`gather_records` brings all records to rank 0, sorted by a key (the position), and refuses
   duplicate keys, so rank 0 sees the very list a single process would have made;
6. rank 0 computes the metrics; :func:`broadcast_from_main` hands the result to every rank so that
   all processes return the same object (write files only where :attr:`DistEnv.is_main`).

Per-item results are identical to a single process as long as a model's output for one item does not
depend on which other items share its batch (true up to float rounding; metrics from integer
predictions are then identical, float metrics such as IoU can differ in the last bits unless
``batch_size=1``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch.utils.data import Sampler

__all__ = [
    "DistEnv",
    "ShardSampler",
    "broadcast_from_main",
    "dist_env",
    "gather_objects",
    "gather_records",
    "init_distributed",
    "is_main_process",
    "resolve_device",
    "shard",
    "shard_indices",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that computes the metrics and should print / write results."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer (as torchrun sets it), got {text!r}"
        ) from None


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_env() -> DistEnv:
    """The current process's place: from the initialised process group if there is one, else from the
    ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` variables torchrun sets (a world of one without them)."""
    local_rank = _env_int("LOCAL_RANK", 0)
    if _group_ready():
        return DistEnv(torch.distributed.get_world_size(), torch.distributed.get_rank(), local_rank)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got WORLD_SIZE={world_size}, RANK={rank}")
    if world_size > 1 and "RANK" not in os.environ:
        # Guessing rank 0 would make every process believe it is the main one.
        raise ValueError(f"WORLD_SIZE={world_size} is set but RANK is not; start the processes with torchrun")
    return DistEnv(world_size, rank, local_rank)


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true outside torchrun)."""
    return dist_env().is_main


def resolve_device(device: str | torch.device, env: DistEnv | None = None) -> torch.device:
    """``device`` as a ``torch.device``; with several processes a CUDA device without an index becomes
    ``cuda:LOCAL_RANK`` so that each process of a node uses its own GPU."""
    device = torch.device(device)
    env = dist_env() if env is None else env
    if device.type == "cuda" and device.index is None and env.distributed:
        return torch.device("cuda", env.local_rank)
    return device


def init_distributed(
    device: str | torch.device = "cpu",
    *,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> DistEnv:
    """Initialise the default process group if this process is one of several and it is not done yet.

    Outside torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) nothing happens. An existing process group
    is used as it is. The group is left initialised on return: the caller may run further evaluations
    and should call ``torch.distributed.destroy_process_group()`` before exiting.

    Args:
        device: the device the evaluation will run on; picks the backend and, for CUDA, the GPU of
            this process (``torch.cuda.set_device``), which NCCL's object collectives need.
        backend: ``"nccl"``, ``"gloo"``, ...; default ``"nccl"`` for a CUDA device, else ``"gloo"``.
        timeout: passed to ``torch.distributed.init_process_group``.
    """
    env = dist_env()
    if not env.distributed or _group_ready():
        return env
    if not torch.distributed.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} asks for {env.world_size} processes but this torch build has no "
            "torch.distributed; run a single process"
        )
    resolved = resolve_device(device, env)
    if backend is None:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        if backend == "nccl":
            # Binding the group to this process's GPU avoids NCCL guessing (and warning about) the device.
            kwargs["device_id"] = resolved
    torch.distributed.init_process_group(**kwargs)
    return dist_env()


# --------------------------------------------------------------------------- sharding


def shard_indices(num_items: int, env: DistEnv | None = None) -> range:
    """Positions ``i`` in ``range(num_items)`` with ``i % world_size == rank``: disjoint, covering, unpadded."""
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    env = dist_env() if env is None else env
    return range(env.rank, num_items, env.world_size)


def shard(items: Sequence[T], env: DistEnv | None = None) -> list[T]:
    """This process's share of ``items`` (those at :func:`shard_indices`), in their order; a new list."""
    return [items[i] for i in shard_indices(len(items), env)]


class ShardSampler(Sampler[int]):
    """A ``DataLoader`` sampler yielding this process's :func:`shard_indices`, in order and without padding
    (``DistributedSampler(shuffle=False)`` pads the last shard with repeated items)."""

    def __init__(self, num_items: int, env: DistEnv | None = None) -> None:
        self.indices = shard_indices(num_items, env)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- collecting results


def _check_group(env: DistEnv) -> None:
    if env.distributed and not _group_ready():
        raise RuntimeError(
            f"this process is rank {env.rank} of {env.world_size} but no process group is initialised; "
            "call cubistmerge.eval.distributed.init_distributed() first"
        )


def gather_objects(obj: T, env: DistEnv | None = None) -> list[T] | None:
    """Every process's ``obj`` (picklable), indexed by rank, on rank 0; ``None`` on the other ranks.

    A world of one gets ``[obj]``. Every process of the group must call it.
    """
    env = dist_env() if env is None else env
    if not env.distributed:
        return [obj]
    _check_group(env)
    received: list[Any] | None = [None] * env.world_size if env.is_main else None
    torch.distributed.gather_object(obj, received, dst=0)
    return received


def gather_records(
    records: Sequence[T],
    key: Callable[[T], Any],
    env: DistEnv | None = None,
) -> list[T] | None:
    """All processes' records on rank 0, sorted by ``key`` (``None`` on the other ranks).

    ``key`` must identify a record and be orderable (e.g. its item's global position, or
    ``(image_id, annotation_id)``):
    sorting makes the order independent of how the items were sharded, and a key seen twice means the
    shards overlapped (e.g. a padding sampler), which would bias every metric, so it raises
    ``ValueError``. The given sequences are not modified.
    """
    env = dist_env() if env is None else env
    parts = gather_objects(list(records), env)
    if parts is None:
        return None
    merged = [record for part in parts for record in part]
    keyed = sorted(((key(record), record) for record in merged), key=lambda pair: pair[0])
    for (previous, _), (current, _) in zip(keyed, keyed[1:], strict=False):  # neighbours
        if previous == current:
            raise ValueError(
                f"record key {current!r} was produced more than once across the {env.world_size} process(es); "
                "the work was not split into disjoint shards (use shard()/ShardSampler, not a padding sampler)"
            )
    return [record for _, record in keyed]


def broadcast_from_main(obj: T | None, env: DistEnv | None = None) -> T:
    """Rank 0's ``obj`` (picklable) on every process; the others pass anything (e.g. ``None``)."""
    env = dist_env() if env is None else env
    if not env.distributed:
        return obj  # type: ignore[return-value]
    _check_group(env)
    box = [obj if env.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]
