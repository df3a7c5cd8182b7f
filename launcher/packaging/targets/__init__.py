"""What `lalo build` makes, one module per target (build.py dispatches to them)."""
