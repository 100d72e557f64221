"""Several processes on one machine (data-parallel client training under `accelerate launch`), CPU included.

Two facts of accelerate 1.x shape this module:

- `PartialState` is a process-wide singleton and only picks the gloo CPU backend when created with `cpu=True`;
  whoever creates it first decides. [`process_state`] creates it the way the Trainer would on this machine.
- `accelerate launch --cpu --num_processes N` forks the N processes through `mpirun` only; without an MPI hostfile it
  starts ONE process (and sets `MASTER_ADDR`). [`relaunch_cpu_data_parallel`] detects that case and re-executes the
  script under `torch.distributed.run` with N processes, which is what the user asked accelerate for.
- `PartialState.wait_for_everyone` calls `torch.distributed.barrier(device_ids=[local rank])`, and torch turns those
  ids into devices of the machine's accelerator even for a gloo group of CPU processes: with one GPU visible, rank 1
  asks for `cuda:1` ("CUDA error: invalid device ordinal", seen on an H200 machine on 2026-11-30). The relaunched CPU
  processes therefore do not see the GPUs (`CUDA_VISIBLE_DEVICES=""`): `--cpu` asked for the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def process_state():
    """accelerate's `PartialState`, on CPU when no CUDA device exists or `accelerate launch --cpu` asked for it (so
    several processes use gloo)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # `accelerate launch --cpu` (ACCELERATE_USE_CPU) on a machine with a GPU: N processes on one GPU would all ask
    # for cuda:<rank> under NCCL; they must use gloo on the CPU as asked
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _launcher_num_processes(pid: int) -> int | None:
    """`--num_processes` of the `accelerate launch` command line of process `pid` (Linux `/proc`), if any."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") or a == "launch" for a in args):
        return None
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None


def relaunch_cpu_data_parallel(argv: Sequence[str] | None = None) -> None:
    """Re-execute the running script under `torch.distributed.run` when `accelerate launch --cpu --num_processes N`
    (N > 1) started it as a single process because no MPI is configured. Returns (does nothing) otherwise."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "WORLD_SIZE" in env or "RANK" in env:
        return
    if "MASTER_ADDR" not in env or env.get("HF_PERFIT_NO_RELAUNCH"):
        return  # accelerate sets MASTER_ADDR only when more than one process was asked for
    n = _launcher_num_processes(os.getppid())
    if not n or n < 2:
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    logger.warning("accelerate --cpu without MPI starts one process; starting %d with torch.distributed.run", n)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes: no barrier on cuda:<rank> (module docstring); inherited by execv
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_addr",
        env["MASTER_ADDR"],
        "--master_port",
        env.get("MASTER_PORT", "29500"),
        sys.argv[0],
        *argv,
    ]
    os.execv(sys.executable, command)


__all__ = ["process_state", "relaunch_cpu_data_parallel"]
