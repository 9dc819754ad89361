"""Converters to Distributed Llama's `.m` / `.t` files: Hugging Face folders (`hf`) and GGUF files (`gguf`).

Installed as `dllama_mpi.convert` (package-dir mapping in pyproject.toml).
"""
