"""Code that runs inside Ray actors (and the driver's helpers it shares with them)."""

import sys

# Imported by transformers whenever installed (MLflow installs both), for features nothing
# here uses: scikit-learn for one assisted-generation option (~1.4 s of CPU), SciPy for the
# object-detection losses (~0.6 s). Every actor that starts would pay for them.
_UNUSED_BY_TRANSFORMERS = ("sklearn", "scipy")


def _import_transformers_without_unused() -> None:
    """Import transformers' model code with those packages hidden; hidden only meanwhile,
    so a judge function or anything later can still import them."""
    if "transformers.generation" in sys.modules:
        return
    hidden = [name for name in _UNUSED_BY_TRANSFORMERS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # find_spec() -> None
    try:
        import transformers.generation.candidate_generator  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


_import_transformers_without_unused()
