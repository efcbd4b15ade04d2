"""Training Medusa heads (jaxmedusa.train)."""
