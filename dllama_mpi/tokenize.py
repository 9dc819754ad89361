"""`dllama-mpi tokenize`: token ids and pieces of a text, printed as llama.cpp's llama-tokenize prints
them (tools/tokenize/tokenize.cpp):

    `%6d -> '%s'` per token (the piece's raw bytes), or with `--ids` one Python-style list
    `[1, 2, 3]`; `--show-count` adds `Total number of tokens: N`. As there, BOS is added when the
    tokenizer adds one (`--no-bos` drops it) and special tokens in the text are parsed
    (`--no-parse-special` treats them as text). `--json`: {"ids", "pieces", "count"} instead.

Runs on the root only (no model is loaded); under mpiexec the other ranks just exit.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import ConfigError
from .startup import read_text_file, spmd


def format_tokens(ids, pieces: list[bytes], ids_only: bool, show_count: bool) -> bytes:
    """llama-tokenize's stdout for these tokens."""
    if ids_only:
        out = b"[" + ", ".join(str(i) for i in ids).encode() + b"]\n"
    else:
        out = b"".join(b"%6d -> '" % i + p + b"'\n" for i, p in zip(ids, pieces))
    if show_count:
        out += b"Total number of tokens: %d\n" % len(ids)
    return out


@click.command()
@click.option("--tokenizer", "tokenizer_path", type=click.Path(readable=False), default=None,
              help="A Distributed Llama .t tokenizer or a GGUF model (its vocabulary) [default: the default model's].")
@click.option("--model", "model_path", type=click.Path(readable=False), default=None,
              help="A GGUF model: tokenize with its vocabulary (as --tokenizer FILE.gguf).")
@click.option("--text", default=None, help="Text to tokenize.")
@click.option("--file", "text_file", type=click.Path(readable=False), default=None, help="UTF-8 file to tokenize.")
@click.option("--ids", "ids_only", is_flag=True, help="Print only the ids, as a list like [1, 2, 3].")
@click.option("--no-bos", is_flag=True, help="Do not add BOS even if the tokenizer adds one.")
@click.option("--no-parse-special", is_flag=True, help="Treat special-token texts as plain text.")
@click.option("--show-count", is_flag=True, help="Print the number of tokens at the end.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: ids, pieces, count.")
@spmd
def tokenize(comm, tokenizer_path, model_path, text, text_file, ids_only, no_bos, no_parse_special, show_count,
             as_json):
    """Print the token ids and pieces of --text or --file (llama-tokenize's format)."""
    if not comm.is_root:
        return
    from .startup import load_tokenizer

    if (text is None) == (text_file is None):
        raise ConfigError("give exactly one of --text and --file")
    if text_file is not None:
        text = read_text_file(text_file)
    path = tokenizer_path or model_path
    if path is None:
        from .convert.smollm2 import default_models_dir, ensure_default_model

        path = ensure_default_model(default_models_dir())[0]
    elif not os.path.isfile(path):
        raise ConfigError(f"{path}: tokenizer file not found")
    tok = load_tokenizer(path, None)
    ids = tok.encode(text, add_bos=False if no_bos else None, parse_special=not no_parse_special)
    pieces = [tok.token_bytes(i) for i in ids]
    if as_json:
        print(json.dumps({"ids": ids, "pieces": [p.decode("utf-8", errors="replace") for p in pieces],
                          "count": len(ids)}))
        return
    sys.stdout.buffer.write(format_tokens(ids, pieces, ids_only, show_count))
    sys.stdout.flush()


def register(group) -> None:
    group.add_command(tokenize)
