"""The HTTP service: settings, scheduler, worker, FastAPI app, metrics, CLI."""
