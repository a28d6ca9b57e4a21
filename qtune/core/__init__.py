"""What every stage stands on: the error type and exit codes, safe file writes, the folders qtune owns, checkpoints,
processes and CPU threads, the logger, the libraries' noise, and the test hooks. Imports no torch at module level."""
