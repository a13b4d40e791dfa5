"""Code that runs inside Ray actors (and the driver's helpers it shares with them)."""

import sys


def _import_transformers_without_sklearn() -> None:
    """transformers imports scikit-learn (~1.4 s of CPU, in every actor that starts) whenever
    it is installed, for one assisted-generation option nothing here uses; MLflow is what
    installs it. Hidden only while transformers' generation code is imported: a judge
    function or anything later can still import it."""
    if "sklearn" in sys.modules or "transformers.generation" in sys.modules:
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # find_spec() -> None
    try:
        import transformers.generation.candidate_generator  # noqa: F401
    finally:
        del sys.modules["sklearn"]


_import_transformers_without_sklearn()
