"""latentforge.launch."""
