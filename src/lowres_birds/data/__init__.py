"""Data: tables and their checks (tables), decoding and the image cache (images), splits, the synthetic demo set."""
