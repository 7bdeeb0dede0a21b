"""Models: the family table, parameter arithmetic from the architecture, loading, and
ftlab's device-independent quantization (``quant``)."""
