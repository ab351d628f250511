"""lowres-birds: classifiers for low-resolution (64x64) bird photos."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so `import lowres_birds` (and the CLI's --help) stays fast.
    if name == "Classifier":
        from lowres_birds.predict.classifier import Classifier

        return Classifier
    raise AttributeError(name)


__all__ = ["Classifier", "__version__"]
