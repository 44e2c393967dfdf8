"""Training: plan (flags -> config + run folder), the loop, data sources behind one registry."""
