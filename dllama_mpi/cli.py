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

if __name__ == "__main__":
    main()
