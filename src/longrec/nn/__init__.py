"""Building blocks shared by the models; each is small and tested alone."""
