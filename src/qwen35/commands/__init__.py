"""One module per CLI verb (see qwen35.cli)."""
