"""runtime: placeholder package; implemented by its own issue."""
