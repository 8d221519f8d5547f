"""Benchmarks of the qwen35 engine against its peers (transformers, llama.cpp); see bench/run.py and
docs/benchmarks.md. Not part of the installed package: run from a source checkout (`qwen35 bench`,
`python -m bench`)."""
