"""pushgate dataplane."""
