"""Precomputed CLIP embeddings in the LAION / clip-retrieval layout (``img_emb/img_emb_<i>.npy``
beside ``metadata/metadata_<i>.parquet``): the folder and its reader (:mod:`.layout`,
:mod:`.reader`), matches resolved to rows (:mod:`.gather`), the ``import-embeddings``
(:mod:`.importer`), ``knn-retrieve`` (:mod:`.retrieve`, searching with :mod:`.search`) and ``export-embeddings``
(:mod:`.export`) stages, and candidate sets (:mod:`.candidates`)."""
