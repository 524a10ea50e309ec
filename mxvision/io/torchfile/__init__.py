"""PyTorch ``.pt`` files without PyTorch: a restricted reader (nothing executes), its unpickler, a writer for tests."""
