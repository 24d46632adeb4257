"""cellseg."""
