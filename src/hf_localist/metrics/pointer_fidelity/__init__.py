"""Directory of the evaluate metric module of the same name (see hf_localist.metrics)."""
