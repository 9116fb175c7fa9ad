"""`method=specificity`: a circuit of one task ablated, measured on another task."""
