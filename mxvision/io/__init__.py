"""Files to arrays: reading images and headers, downloading and extracting, PyTorch weight files."""
