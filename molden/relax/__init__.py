"""Relaxation: batched L-BFGS / FIRE with a learned or physical force field."""
