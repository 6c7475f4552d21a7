"""Stage 2: scLibrary, rank-value gene tokens per cell paired with texts describing its identity."""
