"""classifier stage."""
