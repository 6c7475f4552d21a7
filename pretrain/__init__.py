"""Stage 3: the LangCell dual encoder and its DeepSpeed pre-training."""
