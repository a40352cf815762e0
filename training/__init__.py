"""latentforge.training."""
