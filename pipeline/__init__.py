"""Primer: priming subsets from LAION-scale metadata (Neural Priming, arXiv 2306.10191).

One module per stage; each is a pure core over Arrow tables or numpy arrays plus a thin
Spark / img2dataset / DataLoader shell. See README.md for the stage table.
"""

__version__ = "0.1.0"
