"""The command-line entry points (`python -m experiments.NAME`)."""
import signal as _signal
import sys as _sys


def _stop_on_sigterm(signum, frame):
    """SIGTERM before (or after) the training loop: nothing is due to be saved.

    The loop installs its own handler (save, then stop) while it runs. Exits
    at once (os._exit: an exception raised here may be swallowed by a callback
    of JAX, and interpreter teardown under live XLA threads can crash), after
    releasing the workdir or out_dir locks this process holds.
    """
    del signum, frame
    import os
    workdir = _sys.modules.get("vsml_jax.training.workdir")
    if workdir is not None:
        workdir.release_all()
    _sys.stderr.write("Stopped by SIGTERM outside a training step: nothing to save "
                      "(completed checkpoints are kept).\n")
    _sys.stderr.flush()
    os._exit(0)


# Only when an entry point runs (`python -m experiments.X` sets argv[0] to "-m"
# while it imports this package), first thing, before the slow imports.
if _sys.argv and _sys.argv[0] == "-m":
    _signal.signal(_signal.SIGTERM, _stop_on_sigterm)
