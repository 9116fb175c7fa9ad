"""etk: entity-tracking toolkit for studying how fine-tuning changes model mechanisms.

The Python API (`etk.load_model`, `etk.path_patching`, `etk.faithfulness`, `etk.dcm`, `etk.cmap`, `etk.circuit_search`,
`etk.model_diff`, `etk.knockout`, `etk.load_result`) lives in `etk.api`; it is imported on first use, so `import etk`
stays light."""

__version__ = "0.1.0"

_API = ("load_model", "load_result", "path_patching", "minimality", "faithfulness", "circuit_search", "dcm", "cmap",
        "model_diff", "knockout")


def __getattr__(name: str):
    if name in _API:
        from etk import api

        return getattr(api, name)
    raise AttributeError(f"module 'etk' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
