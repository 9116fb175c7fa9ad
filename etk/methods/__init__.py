"""Methods: accuracy evaluation, path patching, circuit evaluation, DCM, CMAP, knockout."""
