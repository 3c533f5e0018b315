"""Work items for the plan pool's tests: importable by spawned workers, light (no torch)."""

import os
import signal


def square_unless_told_to_die(x: int, death: str | None) -> int:
    if death:
        os.kill(os.getpid(), getattr(signal, death))
    return x * x
