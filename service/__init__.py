"""wildreid service: the FastAPI app and its storage (see the service issue)."""
