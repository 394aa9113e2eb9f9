"""Simulated voters (oracles) and a prompt set that drive the loop without a person."""
