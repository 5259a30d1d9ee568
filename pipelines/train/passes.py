"""The training data, one pass at a time: every pass over the data is its own Ray dataset (its shard order and
augmentation drawn from (seed, pass)), split across the ranks by rank 0 and handed to the others through the
training process group. The pass index lives in the checkpoint, so a resumed run (a new ``fit`` or a worker restart
inside one) reads the pass it was in, wherever it stopped; a dataset built once by the driver would start again at
the first pass order."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from ray.data import DataIterator, ExecutionResources

from pgseg.distributed import Collectives
from pipelines.data.ingest import Ingest
from pipelines.train.plan import TrainingError


def pass_split(ingest: Ingest, pass_index: int, world: Collectives, reserved: ExecutionResources) -> DataIterator:
    """This rank's part of pass ``pass_index`` (every rank the same number of rows). A collective: every rank calls
    it for the same pass. ``reserved``: what the training workers hold, which the pass's read and map tasks must
    leave them."""
    splits: list[Any] = [None]
    if world.rank == 0:
        ds = ingest.dataset(pass_index)
        ds.context.execution_options.exclude_resources = reserved
        ds.context.enable_progress_bars = False  # a bar per pass in a worker's log says nothing the curves don't
        if world.world == 1:  # no split: streaming_split's coordinator actor costs a new process per pass
            return ds.iterator()
        splits = [ds.streaming_split(world.world, equal=True)]
    if world.world > 1:
        dist.broadcast_object_list(splits, src=0)
    return splits[0][world.rank]


def pass_batches(ingest: Ingest, world: Collectives, reserved: ExecutionResources, batch_size: int,
                 shuffle_buffer: int, seed: int | None, device: torch.device, start_pass: int = 0,
                 skip: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], tuple[int, int]]]:
    """Endless batches, pass after pass from ``start_pass`` (its first ``skip`` batches left out). The ranks' parts of
    a pass have the same length, so they start each pass together. Yields (batch, position after it): the position
    is (pass, batches of it done), or (next pass, 0) after a pass's last batch (a batch is held back to know), so a
    checkpoint taken there resumes at the next pass without reading this one again. ``seed``: the local shuffle's
    seed (with the pass), None for an unseeded one."""
    pass_index = start_pass
    while True:
        part = pass_split(ingest, pass_index, world, reserved)
        stream = part.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                         pin_memory=device.type == "cuda",  # then copied without blocking
                                         local_shuffle_buffer_size=shuffle_buffer or None,
                                         local_shuffle_seed=None if seed is None else seed * 1_000_003 + pass_index)
        n, held = 0, None
        for batch in stream:
            n += 1
            if n <= skip:
                continue
            if held is not None:
                yield held, (pass_index, n - 1)
            held = batch
        if n == 0:
            raise TrainingError(f"this worker's part of data pass {pass_index} holds no complete batch of "
                                f"{batch_size}: lower data.batch_size or add data")
        skip, pass_index = 0, pass_index + 1
        if held is not None:
            yield held, (pass_index, 0)
