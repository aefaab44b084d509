"""Serving a span: the gRPC edge, the engine, the scheduler and the one lifecycle."""
