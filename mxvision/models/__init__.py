"""Networks: the one registry (registry.py), the families that register in it, and the weights store."""
