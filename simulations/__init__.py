"""Simulated federations on one machine (`fedsim`)."""
