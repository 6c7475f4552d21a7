"""Stage 4: benchmarks (zero-shot, few-shot, fine-tune, retrieval, integration) and `annotate`."""
