"""Running under a launcher (``torchrun``, or anything that sets its ``RANK``/``WORLD_SIZE``): which process does what.

Training is data-parallel (DDP through `transformers.Trainer`); every other stage is one process's work. The
launcher starts the same command in every process, so the stages around training follow one rule: the main
process (rank 0) writes, the others wait for it and then read what it wrote. Generation, the data split and the
logit cache therefore run once (the other ranks find them done and reuse them, as a rerun would), the student is
saved once, and evaluation and the report run on the main process only.

Without a launcher (``WORLD_SIZE`` unset or 1) every helper here is a no-op, and ``accelerate`` is not imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distill.errors import DistillError


def world_size() -> int:
    """Processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int | None:
    """This process's index on its machine under a launcher (its GPU), else None."""
    return int(os.environ["LOCAL_RANK"]) if world_size() > 1 and "LOCAL_RANK" in os.environ else None


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it after rank 0 left it (and find its outputs to reuse)."""
    if world_size() > 1 and not is_main_process():
        wait_for_everyone()
    yield
    if world_size() > 1 and is_main_process():
        wait_for_everyone()


def wait_for_everyone() -> None:
    """A barrier across the launcher's processes (no-op without one)."""
    if world_size() == 1:
        return
    try:
        _state().wait_for_everyone()
    except RuntimeError as e:  # the collective broke: a peer exited, usually on an error of its own
        raise DistillError(
            f"process {os.environ.get('RANK', '?')} of {world_size()}: another process stopped (see its message "
            "above); stopping too"
        ) from e


def _state():
    """accelerate's process state, which sets up the process group the Trainer then uses.

    It is a singleton that keeps the settings it was first made with: ``cpu`` must be what the Trainer asks for
    (`training_arguments` sets ``use_cpu`` without CUDA), or on a CPU machine it would settle on "not distributed"
    and the Trainer would silently train each process alone.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
