"""Error types shared across packages (kept free of heavy imports so the CLI can catch them)."""


class DataError(RuntimeError):
    """The data stream cannot go on: too many bad samples, no readable samples, or a resume
    point that no longer fits the shards."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, failing its checksums, unreadable config."""


class DeviceError(ValueError):
    """The device asked for cannot be used on this machine (the message says why: no CUDA, a driver older
    than the torch wheel's CUDA); a one-line error at the command line, not a traceback."""
