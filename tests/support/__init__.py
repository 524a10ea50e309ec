"""Helpers shared by the test suite: a real HTTP server on 127.0.0.1, builders of archives and DICOM files."""
