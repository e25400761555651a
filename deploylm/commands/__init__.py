"""One module per CLI command; each exposes `command` and stays thin (parse -> library call -> print)."""
