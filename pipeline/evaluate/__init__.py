"""Stage 6, evaluation: the priming classifier and its baselines (``classify``) and the
accuracy table over cached embeddings (``stage``)."""
