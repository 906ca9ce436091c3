"""memory_service: placeholder package; implemented by its own issue."""
