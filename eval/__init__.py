"""latentforge.eval."""
