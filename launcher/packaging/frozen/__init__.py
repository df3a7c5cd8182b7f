"""The frozen lalo: how it is made (PyInstaller, in the old-glibc build root) and what it runs
first (entry, model seeding)."""
