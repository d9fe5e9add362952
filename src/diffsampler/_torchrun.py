"""Make ``torchrun --nproc-per-node P -- diffsampler generate ...`` work from any directory.

Why this exists: torch's launcher (``torch/distributed/run.py``, ``config_from_args``, torch 2.13) starts
each worker as ``[os.getenv("PYTHON_EXEC", sys.executable), "-u", training_script, *args]`` unless ``-m``
(``--module``) or ``--no-python`` is given. So the literal form above runs ``python -u diffsampler
generate ...``, and Python takes ``diffsampler`` for a script path relative to the current directory: every
worker dies with ``can't open file '<cwd>/diffsampler'`` and torchrun reports a ``ChildFailedError``. Issue
18 spells that literal form as a contract that checks outside this repository call, so the package
installs a one-line startup hook, ``diffsampler-torchrun.pth`` in site-packages (its text is ``PTH`` in
``setup.py``, which writes it into both the wheel and the editable wheel), that calls :func:`reexec` in
exactly that case; the worker then becomes ``python -u -m diffsampler ...``, which is what ``torchrun -m
diffsampler`` runs.

The hook costs nothing in any other process: it compares ``sys.orig_argv[1:3]`` with ``["-u",
"diffsampler"]`` and looks for ``TORCHELASTIC_RUN_ID`` (set by torchrun in every worker) before loading
this file, which it runs by path with ``runpy.run_path`` so that ``diffsampler/__init__.py`` (and torch)
is not imported. This module imports only ``os`` and ``sys``; keep it that way.
"""

import os
import sys

#: The two interpreter arguments torchrun puts before the script name when neither ``-m`` nor
#: ``--no-python`` is given.
TORCHRUN_ARGV = ["-u", "diffsampler"]


def worker_command(orig_argv, environ, executable, lexists=os.path.lexists):
    """The command to replace this process with, or None to leave it alone.

    Only ``<python> -u diffsampler ...`` started by torchrun (``TORCHELASTIC_RUN_ID`` in ``environ``), on
    POSIX (``os.execv`` replaces the process there; elsewhere it would start a second one behind
    torchrun's back), with no ``./diffsampler`` of any kind (a script or directory of that name is what
    Python was asked to run, and it runs), and a known interpreter. ``orig_argv[0]`` may be torchrun's
    ``PYTHON_EXEC`` rather than ``executable``; the replacement uses ``executable``, the interpreter
    this hook is installed in (a wrapper that adds interpreter options does not match ``orig_argv[1:3]``
    and is left alone).
    """
    if list(orig_argv[1:3]) != TORCHRUN_ARGV or "TORCHELASTIC_RUN_ID" not in environ:
        return None
    if os.name != "posix" or not executable or lexists("diffsampler"):
        return None
    return [executable, "-u", "-m", "diffsampler", *orig_argv[3:]]


def reexec():
    """Replace this torchrun worker with ``python -u -m diffsampler ...`` when :func:`worker_command` says so."""
    command = worker_command(sys.orig_argv, os.environ, sys.executable)
    if command is not None:
        os.execv(command[0], command)
