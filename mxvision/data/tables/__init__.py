"""Small tables mxvision ships as package data (see README.md in this folder)."""
