"""Stage 1, the text filter: LAION captions matched against a task's class names, in Spark.

``stage`` holds the stage; ``matcher`` the matching engines, ``token_ac`` the token automaton
and ``kernels`` the compiled loops.
"""
