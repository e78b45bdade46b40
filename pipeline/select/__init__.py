"""Stage 4, selection: the CLIP-score and transductive filters (``filters``) over FAISS
searches (``knn``). Filters write decisions; :mod:`pipeline.materialise` applies them."""
