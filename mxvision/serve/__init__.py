"""Serving mxvision's models: model archives for MXNet Model Server (:mod:`.archive`), the handler
that runs inside it (:mod:`.handler`), and starting it with a web page beside it (:mod:`.server`)."""
