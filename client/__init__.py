"""pushgate client."""
