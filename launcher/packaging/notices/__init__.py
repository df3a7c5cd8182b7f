"""NOTICE and LICENSES/: what a build packages, the frozen lalo's components, licence texts."""
