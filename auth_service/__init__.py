"""pushgate auth_service."""
