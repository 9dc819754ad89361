"""`dllama-mpi inference`: generate text from one prompt and exit."""

from __future__ import annotations

import json
import sys

import click

from .errors import ConfigError
from .grammar import read_schema
from .startup import log, model_options, sampling_options, spec_config, spec_options, spmd, start


@click.command()
@model_options
@sampling_options
@spec_options
@click.option("--prompt", required=True, help="Prompt text (special tokens such as <|im_start|> are parsed).")
@click.option("--steps", type=int, default=64, show_default=True, help="Number of tokens to generate.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after an end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (with the text) on stdout instead of the text.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None,
              help="A JSON schema file: the output is a JSON value valid under it (constrained decoding; "
                   "default: free text).")
@spmd
def inference(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load,
              max_batch, temperature, topp, seed, prompt, steps, ignore_eos, as_json, json_schema):
    """Generate text from a prompt."""
    from .generate import Generator
    from .sampler import Sampler

    if comm.is_root and steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {steps}")
    schema = read_schema(json_schema, "--json-schema") if comm.is_root and json_schema else None
    spec = spec_config() if comm.is_root else None
    engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len,
                              sync_scheme, load, max_batch)
    if not comm.is_root:
        engine.serve()
        return
    try:
        ids = tokenizer.encode(prompt)
        if len(ids) > engine.max_seq_len:
            raise ConfigError(f"prompt has {len(ids)} tokens, more than the context ({engine.max_seq_len}); "
                              f"raise --max-seq-len or shorten the prompt")
        sampler = Sampler(tokenizer.vocab_size, temperature, topp, seed)
        grammar = None
        if schema is not None:
            from .grammar import Grammars, GrammarError

            try:
                grammar = Grammars(tokenizer, engine.h.vocab_size).compile_schema(schema).matcher()
            except GrammarError as e:
                raise ConfigError(f"--json-schema {json_schema}: {e}") from None
        gen = Generator(engine, tokenizer, spec=spec)
        pieces, ids_out = [], []
        for piece in gen.stream(ids, steps, sampler, ignore_eos=ignore_eos, grammar=grammar):
            ids_out.append(piece.token)
            pieces.append(piece.text)
            if not as_json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        st = gen.last
        summary = {"prompt": prompt, "prompt_ids": ids, "generated_ids": ids_out, "text": "".join(pieces),
                   "nodes": comm.size, "nthreads": engine.nthreads, "buffer_float_type": engine.buffer_type,
                   "sync": engine.sync.scheme, "load_seconds": round(engine.load_seconds, 3), "spec": spec.method,
                   **st.as_dict()}
        if as_json:
            print(json.dumps(summary))
        else:
            print()
            log(f"prompt: {st.evaluated_prompt_tokens} tokens, {st.prompt_tps:.2f} tok/s | generation: "
                f"{st.generated_tokens} tokens, {st.generate_tps:.2f} tok/s, "
                f"{summary['ms_per_token']:.2f} ms/token (compute {summary['ms_per_token_compute']:.2f} + "
                f"sync {summary['ms_per_token_sync']:.2f}){_spec_summary(st) if spec.on else ''} | "
                f"finish: {st.finish_reason}")
    finally:
        engine.stop_workers()


def _spec_summary(st) -> str:
    return (f" | spec: {st.tokens_per_pass:.2f} tokens/pass, {st.accepted_tokens}/{st.draft_tokens} drafted "
            f"accepted ({100 * st.acceptance:.0f} %)")


def register(group) -> None:
    group.add_command(inference)
