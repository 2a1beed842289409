"""Example deployments: the three of Modelbit's batch-inference page, and a small model."""
