"""The training machinery: mesh & sharding, optimizer & steps, checkpoints, metrics."""
