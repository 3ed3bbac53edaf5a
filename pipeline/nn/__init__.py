"""The network: torch blocks, stacked modules, pairings and the local objectives (pure torch: no I/O, no Ray)."""
