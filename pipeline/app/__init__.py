"""The application around the stages: the ``primer`` command line (``cli``) and the run of
every stage under one run directory (``subset``)."""
