"""latentforge.data."""
