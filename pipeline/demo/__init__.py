"""The offline demo: a loopback image server (``imageserver``), LAION-like synthetic
metadata (``synthetic``) and ``primer demo`` itself (``run``)."""
