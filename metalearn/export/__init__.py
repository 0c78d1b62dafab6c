"""`metalearn export`: a run's weights as a safetensors file (write) and that file's format, read back (format)."""
