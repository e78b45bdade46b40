"""Stage 3, embeddings: open_clip over pool shards, target-task images and class prompts.

``tasks`` reads target tasks in their on-disk layouts.
"""
