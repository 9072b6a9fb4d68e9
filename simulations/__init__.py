"""Experiment configs (omegaconf YAML) and the runner that executes them."""
