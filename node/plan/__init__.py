"""Pure planning, torch-free and I/O-free: routing a client's chain and placing a daemon's span."""
