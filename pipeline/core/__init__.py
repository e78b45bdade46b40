"""Shared parts every stage uses: fsspec I/O and atomic writes (``io``), the embedding and
decision formats (``embeddings``), configuration (``config``), Spark sessions (``spark``) and
the torchvision shim (``torchcompat``)."""
