"""The `dllama-mpi` command line: assembles the command modules into one click group. Start-up
and the options the model commands share live in `startup`; each command lives in its own module
and registers itself here."""

from __future__ import annotations

import click

from . import api, batch, benchmark, chat, download, inference, perplexity, serve, tokenize
from .convert.cli import convert


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllama-mpi")
def main():
    """Distributed LLM inference over MPI (Distributed Llama compatible). Run under mpirun -np N."""


for _module in (inference, chat, api, serve, batch, benchmark, download, perplexity, tokenize):
    _module.register(main)
main.add_command(convert)

# `dllama-mpi --help`: one line per command, short enough not to be cut; and one example at the end
# of each command's --help (tests/test_readme.py parses every example, as it does the README's lines).
COMMANDS = {
    "inference": ("Generate text from a prompt.",
                  'mpirun -np 2 dllama-mpi inference --model m.gguf --prompt "Hello" --steps 64'),
    "chat": ("Chat in the terminal (rank 0 reads it).",
             'mpirun -np 2 dllama-mpi chat --model m.gguf --system "You are terse."'),
    "api": ("OpenAI-compatible HTTP API and chat page.",
            "mpirun -np 2 dllama-mpi api --model m.gguf --port 9990 --parallel 8"),
    "serve": ("The API, relaunched when a rank is lost.",
              "dllama-mpi serve -n 2 --model m.gguf --port 9990"),
    "batch": ("Run a JSONL file of prompts (resumable).",
              "mpirun -np 4 dllama-mpi batch --model m.gguf --prompts in.jsonl --out results.jsonl"),
    "benchmark": ("Prompt and decode speed (JSON, --plot).",
                  "mpirun -np 2 dllama-mpi benchmark --model m.gguf --synthetic 128 --steps 32"),
    "download": ("Fetch a model by name into the cache.",
                 "dllama-mpi download gemma3-270m"),
    "perplexity": ("Perplexity or KL divergence of a text.",
                   "mpirun -np 2 dllama-mpi perplexity --model m.gguf --file text.txt --ctx 512"),
    "tokenize": ("Token ids and pieces (llama-tokenize's).",
                 'dllama-mpi tokenize --model m.gguf --text "Hello world"'),
    "convert": ("HF folders / GGUF files to .m and .t.",
                "dllama-mpi convert gguf model.gguf --out-model m.m --out-tokenizer t.t --weights native"),
}
for _name, (_short, _example) in COMMANDS.items():
    main.commands[_name].short_help = _short
    main.commands[_name].epilog = "\b\nExample:\n  " + _example

if __name__ == "__main__":
    main()
