"""What `lalo build` makes, one module per target (build.py dispatches to them); and the engine
wheel of `lalo engine build --wheel` (engine_wheel.py)."""
