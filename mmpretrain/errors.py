"""Error types shared across packages (kept free of heavy imports so the CLI can catch them)."""


class DataError(RuntimeError):
    """The data stream cannot go on: too many bad samples, no readable samples, or a resume
    point that no longer fits the shards."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, failing its checksums, unreadable config."""
