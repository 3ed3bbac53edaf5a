"""isostack's driver side: config, plan, store, data, modules and objectives, scheduler, final stage, CLI."""


def load_encoder(run: str, store: str | None = None):
    """The composed encoder of a finished run as an ``nn.Module`` (see pipeline.final.load_encoder)."""
    from pipeline.final import load_encoder as _load

    return _load(run, store)
