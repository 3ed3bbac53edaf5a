"""isostack: a stack of gradient-isolated modules trained by Ray actors through a versioned activation store.

Packages by phase, in import order (each imports only those before it; tests/test_layout.py checks it):
``errors`` -> ``store`` -> ``data`` -> ``nn`` -> ``planning`` -> ``feed`` -> ``final`` -> ``workers/`` -> ``run`` -> ``cli``.
"""

__all__ = ["load_encoder"]


def __getattr__(name: str):
    # PEP 562: `from pipeline import load_encoder` works without making `import pipeline.errors`
    # (every actor, every CLI call) pay for torch and the store.
    if name == "load_encoder":
        from pipeline.final.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
