"""Models: the factory (factory), the uint8-in wrapper (wrapper) and its pixel path (resolution)."""
