"""CPU thread policy for every heavy oreo process (training, MD, pretraining, evaluation, benchmarks).

torch starts one OpenMP thread per core, and a parallel region waits at a barrier for all its threads. Two
processes that each use every core put twice as many threads as cores on the machine: each barrier then waits
for a thread that the scheduler has parked behind the other process. Measured with
``benchmarks/threads.py`` (two jobs on two cores, energy + forces of one aspirin): 2 threads per job ran 4-6x
slower side by side than alone, and up to 190x where idle threads spin (``OMP_WAIT_POLICY=active``), while one
thread per job ran 1.1x slower. Letting idle threads sleep (``OMP_WAIT_POLICY=passive``) does not fix it and
halves the speed of a job alone.

So every heavy command uses **one thread unless told otherwise**: ``--threads N`` on the command line, else
``$OREO_THREADS``, else ``$OMP_NUM_THREADS``, else 1. Give a job more threads only where it has that many
cores to itself.
"""
import os
from typing import Optional

THREADS_HELP = ("CPU threads for this job (default: $OREO_THREADS, else $OMP_NUM_THREADS, else 1); jobs side by "
                "side should together use no more threads than the machine has cores")


def add_threads_argument(parser, default: Optional[int] = None) -> None:
    """``--threads N`` on an argparse (sub)command that does heavy work."""
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=THREADS_HELP)


def default_threads() -> int:
    """Threads for a job that names none: ``$OREO_THREADS``, else ``$OMP_NUM_THREADS``, else 1."""
    for var in ("OREO_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"${var}={value!r} is not a whole number of threads; set it to e.g. 1") from None
            if n < 1:
                raise ValueError(f"${var}={value!r}: the number of threads must be at least 1")
            return n
    return 1


def set_thread_environment(n: int) -> None:
    """The thread variables of OpenMP, MKL and OpenBLAS, for the runtimes this process has not loaded yet and for
    its child processes."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(int(n))


def threads_from_argv(argv) -> Optional[int]:
    """The ``--threads N`` of a command line, read before argparse (whose parsers import torch and numpy)."""
    for k, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--threads=") else (argv[k + 1] if a == "--threads" and
                                                                       k + 1 < len(argv) else None)
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                return None                # argparse says what is wrong with it
    return None


def configure_threads(threads: Optional[int] = None) -> int:
    """Set this process's CPU threads (``threads``, else :func:`default_threads`); returns the number used.

    Call it before torch is imported where possible: then the OpenMP and MKL runtimes start with that many
    threads (afterwards ``torch.set_num_threads`` still applies)."""
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n = int(threads) if threads is not None else default_threads()
    set_thread_environment(n)          # the runtimes not loaded yet, and every child process (label workers, ...)
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
