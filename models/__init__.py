"""Model code, training and the bundled model repository."""
