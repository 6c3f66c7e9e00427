"""FLOW layer-wise N:M selection, weight and activation pruning on real LLMs (PyTorch)."""
