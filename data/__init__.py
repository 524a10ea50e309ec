"""Small tables mxvision ships (this folder is installed as ``mxvision.tables``; see README.md)."""
