"""Studies comparing importance criteria with the oracle: correlation tables and pruning curves."""
