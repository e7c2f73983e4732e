"""Several CPU processes from ``accelerate launch --cpu --num_processes N``.

accelerate runs several CPU processes only under MPI (``--mpirun_hostfile``). Without it, its launcher sets
``ACCELERATE_USE_CPU``, ``MASTER_ADDR`` and ``MASTER_PORT`` and runs the script once -- no rank, no world size --
so the run trained in one process without a word. :func:`cpu_relaunch` recognises that case, reads the process
count (and machines, machine rank, address, port) from the launcher's own command line, parsed with accelerate's
parser, and returns the ``torch.distributed.run`` (torchrun) command that starts the processes that were asked
for; :func:`run` runs it in place of this process. GPU launches (``--multi_gpu``, ``--use_fsdp``) and
``torchrun`` already start every process and are left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from .errors import UsageError

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
FALLBACK = ("launch the processes with: torchrun --nproc_per_node N -m stepdistill ... (or accelerate launch "
            "--multi_gpu --num_processes N, which runs on the CPU with gloo where no GPU is visible)")


def cpu_relaunch(argv: list[str], env: Mapping[str, str] = os.environ,
                 launcher_argv: list[str] | None = None) -> list[str] | None:
    """The torchrun command that starts the processes ``accelerate launch --cpu`` was asked for, with this
    process's arguments ``argv``; None when this process was not started that way (or one process was asked
    for). ``launcher_argv``: the launcher's command line (default: the parent process's)."""
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or "MASTER_ADDR" not in env:
        return None
    if any(v in env for v in RANK_VARIABLES):
        return None
    if launcher_argv is None:
        launcher_argv = _parent_argv()
    args = _launch_args(launcher_argv or [])
    if args is None:
        raise UsageError(f"accelerate launch --cpu started one process and its command line is unreadable; "
                         f"{FALLBACK}")
    processes, machines = args["num_processes"] or 1, args["num_machines"] or 1
    if processes <= 1 and machines <= 1:
        return None
    if processes % machines:
        raise UsageError(f"accelerate launch: --num_processes {processes} is not a multiple of --num_machines "
                         f"{machines}")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes // machines}",
            f"--nnodes={machines}", f"--node_rank={args['machine_rank'] or 0}",
            f"--master_addr={args['main_process_ip'] or env.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={args['main_process_port'] or env.get('MASTER_PORT', '29500')}",
            "-m", "stepdistill", *argv]


def run(cmd: list[str]) -> int:
    """Run ``cmd`` in place of this process: SIGINT / SIGTERM are passed on, its exit code is returned."""
    proc = subprocess.Popen(cmd)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, _frame: proc.send_signal(s))
    return proc.wait()


def _parent_argv() -> list[str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launch_args(launcher_argv: list[str]) -> dict | None:
    """The process layout an ``accelerate launch`` command line asks for (its ``--config_file`` fills what the
    command line leaves out); None when ``launcher_argv`` is not one."""
    rest = None
    for i, arg in enumerate(launcher_argv):
        name = os.path.basename(arg)
        if name == "accelerate-launch" or arg == "accelerate.commands.launch":
            rest = launcher_argv[i + 1:]
            break
        if arg == "launch" and i > 0 and os.path.basename(launcher_argv[i - 1]) in (
                "accelerate", "accelerate.commands.accelerate_cli"):
            rest = launcher_argv[i + 1:]
            break
    if rest is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(rest)
    except SystemExit:
        return None
    keys = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")
    out = {k: getattr(parsed, k, None) for k in keys}
    if parsed.config_file:
        from accelerate.commands.config import load_config_from_file

        try:
            defaults = load_config_from_file(parsed.config_file)
        except (OSError, ValueError):
            defaults = None
        for k in keys:
            if out[k] is None and defaults is not None:
                out[k] = getattr(defaults, k, None)
    return out
