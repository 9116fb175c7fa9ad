"""`method=positional_hypotheses`: which positional information a DCM head set carries (ordinal from the start or
the end, token offset), scored on the paper's positional variants and on cross-length pairs."""
