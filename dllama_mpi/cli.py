"""`dllama-mpi` command line. Every subcommand that runs a model is SPMD: run it under
`mpirun -np N`; rank 0 talks to the user, the other ranks follow. Errors are caught here, once:
one line on stderr, exit code 2, and every rank of the job ends (comm.abort)."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback

import click

from .errors import ConfigError, DllamaError


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spmd(fn):
    """Run fn(comm, ...) on every rank; turn any exception into one line and a job-wide exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .comm import world

        comm = world()
        try:
            comm.set_sync_timeout(_options.get("sync_timeout"))
            return fn(comm, *args, **kwargs)
        except DllamaError as e:
            # The root runs every check that all ranks would run; a worker only gets here with an
            # error of its own, so it names itself.
            who = "" if comm.is_root else f"rank {comm.rank}: "
            log(f"error: {who}{e}")
            comm.abort(e.exit_code)
        except KeyboardInterrupt:
            if comm.is_root:
                log("interrupted")
            comm.abort(130)
        except Exception as e:  # a bug: keep the trace, still end every rank
            log(f"error: rank {comm.rank}: unexpected {type(e).__name__}: {e}")
            traceback.print_exc()
            comm.abort(1)

    return wrapper


# ------------------------------------------------------------------------------------------------
# shared options

_options: dict = {}   # options every rank applies in `spmd` without passing them to the command


def _sync_timeout_option(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be > 0 seconds, got {value:g}")
    _options["sync_timeout"] = value
    return value


def model_options(fn):
    opts = [
        # paths are checked in resolve_model (one line, once on the root), not by click on every rank
        click.option("--model", "model_path", type=click.Path(readable=False), default=None,
                     help="Distributed Llama .m model (default: the SmolLM2-135M-Instruct model, downloaded on first use)."),
        click.option("--tokenizer", "tokenizer_path", type=click.Path(readable=False), default=None,
                     help="Distributed Llama .t tokenizer (default: the one next to the default model)."),
        click.option("--nthreads", type=int, default=1, show_default=True, help="Threads per rank (C thread pool)."),
        click.option("--buffer-float-type", type=click.Choice(["q80", "f32"]), default=None,
                     help="Format of synchronised activations [default: q80 for q40 weights, f32 for f32]."),
        click.option("--max-seq-len", type=int, default=None, help="Cap the context (KV-cache rows)."),
        click.option("--sync", "sync_scheme", type=click.Choice(["ring", "dllama"]), default="ring", show_default=True,
                     help="ring: reduce-scatter + all-gather; dllama: all-gather of every partial (Distributed Llama's numerics)."),
        click.option("--load", type=click.Choice(["scatter", "local"]), default="scatter", show_default=True,
                     help="scatter: only rank 0 reads the model; local: every rank maps its own slices (shared storage)."),
        click.option("--batch", "max_batch", type=int, default=32, show_default=True, help="Prompt positions per forward pass."),
        click.option("--sync-timeout", type=float, default=None, expose_value=False, callback=_sync_timeout_option,
                     help="Abort the job (exit 3) when a rank waits longer than this many seconds in one "
                          "collective of a forward pass (a stopped or wedged peer) [default: wait forever]."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def sampling_options(fn):
    opts = [
        click.option("--temperature", type=float, default=0.8, show_default=True),
        click.option("--topp", type=float, default=0.9, show_default=True),
        click.option("--seed", type=int, default=None, help="Sampler seed (default: time)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def resolve_model(model_path, tokenizer_path):
    """The default model when --model is omitted (root only; installs it on first use)."""
    if model_path is None:
        from .convert.smollm2 import default_models_dir, ensure_default_model

        model_path, default_tok = ensure_default_model(default_models_dir())
        log(f"no --model given: using the default model {model_path}")
        tokenizer_path = tokenizer_path or default_tok
    if tokenizer_path is None:
        raise ConfigError("--tokenizer is required with --model")
    for what, p in (("model", model_path), ("tokenizer", tokenizer_path)):
        if os.path.isdir(p):
            raise ConfigError(f"{p}: the {what} path is a directory, not a file")
        if not os.path.isfile(p):
            raise ConfigError(f"{p}: {what} file not found")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{p}: {what} file is not readable (permission denied)")
    return model_path, tokenizer_path


def start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme,
          load, max_batch, quiet=False):
    """Collective start-up: returns (engine, tokenizer or None on workers)."""
    from . import kernels
    from .engine import build_engine
    from .formats import open_model
    from .shard import make_plan
    from .tokenizer import Tokenizer

    tokenizer = None
    bft = buffer_float_type
    # Every check runs on the root only, before the first collective: the root prints the one
    # line and aborts the job while the workers are still waiting for the model header.
    if comm.is_root:
        if nthreads < 1:
            raise ConfigError(f"--nthreads must be >= 1, got {nthreads}")
        if max_batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {max_batch}")
        model_path, tokenizer_path = resolve_model(model_path, tokenizer_path)
        model = open_model(model_path)
        h = model.header
        model.close()
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size != h.vocab_size:
            raise ConfigError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"{model_path} has vocab_size {h.vocab_size}")
        make_plan(h, comm.size)  # an impossible node count fails here, before any weight moves
        if max_seq_len is not None and not 0 < max_seq_len <= h.max_seq_len:
            raise ConfigError(f"--max-seq-len must be in 1..{h.max_seq_len} (the model's context), got {max_seq_len}")
    kernels.set_threads(max(nthreads, 1))
    if comm.size > 1:
        # MPICH's report of a lost rank names its pid and host only ("BAD TERMINATION ... PID 123
        # RUNNING AT host"): say which rank each pid is, so that report identifies the rank.
        pids = comm.rank_pids()
        if comm.is_root and not quiet:
            log("ranks: " + ", ".join(f"{r} = pid {pid} on {host}" for r, (pid, host) in enumerate(pids)))
    progress, bar = None, None
    if comm.is_root and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=os.path.getsize(model_path), unit="B", unit_scale=True, desc="loading",
                   file=sys.stderr, disable=not sys.stderr.isatty())
        progress = lambda t: bar.update(t.nbytes)  # noqa: E731
    t0 = time.perf_counter()
    engine = build_engine(comm, model_path if (comm.is_root or load == "local") else None,
                          max_seq_len=max_seq_len, buffer_type=bft or "auto", sync=sync_scheme,
                          load=load, max_batch=max_batch, progress=progress)
    if bar is not None:
        bar.close()
    engine.load_seconds = time.perf_counter() - t0
    if comm.is_root and not quiet:
        h = engine.h
        log(f"model {model_path}: {h.arch_name}, dim {h.dim}, {h.n_layers} layers, {h.n_heads} heads / "
            f"{h.n_kv_heads} kv heads, vocab {h.vocab_size}, weights {('f32', 'f16', 'q40', 'q80')[h.weights_float_type]}, "
            f"buffers {engine.buffer_type}, sync {engine.sync.scheme}, {comm.size} node(s) x {nthreads} thread(s), "
            f"loaded in {engine.load_seconds:.2f} s")
    return engine, tokenizer


# ------------------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dllama-mpi")
def main():
    """Distributed LLM inference over MPI (Distributed Llama compatible). Run under mpirun -np N."""


@main.command()
@model_options
@sampling_options
@click.option("--prompt", required=True, help="Prompt text (special tokens such as <|im_start|> are parsed).")
@click.option("--steps", type=int, default=64, show_default=True, help="Number of tokens to generate.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after an end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (with the text) on stdout instead of the text.")
@spmd
def inference(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load,
              max_batch, temperature, topp, seed, prompt, steps, ignore_eos, as_json):
    """Generate text from a prompt."""
    from .generate import Generator
    from .sampler import Sampler

    if comm.is_root and steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {steps}")
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
        gen = Generator(engine, tokenizer)
        pieces, ids_out = [], []
        for piece in gen.stream(ids, steps, sampler, ignore_eos=ignore_eos):
            ids_out.append(piece.token)
            pieces.append(piece.text)
            if not as_json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        st = gen.last
        summary = {"prompt": prompt, "prompt_ids": ids, "generated_ids": ids_out, "text": "".join(pieces),
                   "nodes": comm.size, "nthreads": nthreads, "buffer_float_type": engine.buffer_type,
                   "sync": engine.sync.scheme, "load_seconds": round(engine.load_seconds, 3), **st.as_dict()}
        if as_json:
            print(json.dumps(summary))
        else:
            print()
            log(f"prompt: {st.evaluated_prompt_tokens} tokens, {st.prompt_tps:.2f} tok/s | generation: "
                f"{st.generated_tokens} tokens, {st.generate_tps:.2f} tok/s, "
                f"{summary['ms_per_token']:.2f} ms/token (compute {summary['ms_per_token_compute']:.2f} + "
                f"sync {summary['ms_per_token_sync']:.2f}) | finish: {st.finish_reason}")
    finally:
        engine.stop_workers()


@main.command()
@click.argument("name", default="smollm2-135m-instruct")
@click.option("--models-dir", type=click.Path(file_okay=False), default=None,
              help="Model cache folder [default: $DLLAMA_MPI_MODELS or ~/.cache/dllama-mpi/models].")
@click.option("--base-url", default=None,
              help="URL prefix of the model files [default: $DLLAMA_MPI_DOWNLOAD_BASE or https://huggingface.co/b4rtaz].")
@click.option("--force", is_flag=True, help="Download again even if the files are in the cache.")
@click.option("--retries", type=click.IntRange(0), default=5, show_default=True,
              help="Resume attempts per file after a dropped connection.")
@click.option("--list", "list_models", is_flag=True, help="List the model names and exit.")
def download(name, models_dir, base_url, force, retries, list_models):
    """Fetch a model by name into the model cache (Distributed Llama's model list, plus
    smollm2-135m-instruct which is converted locally), then print the command that runs it."""
    from .download import download_model, model_names

    if list_models:
        print("\n".join(model_names()))
        return
    try:
        got = download_model(name, models_dir, base_url=base_url, force=force, retries=retries)
    except DllamaError as e:
        log(f"error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        log("interrupted; run the same command again to resume")
        sys.exit(130)
    log(f"model: {got.model}\ntokenizer: {got.tokenizer}")
    print(got.command())


def _register_converters():
    from .convert.cli import convert

    main.add_command(convert)


_register_converters()

from .chat import register as _register_chat  # noqa: E402  (dllama-mpi chat)
_register_chat(main)
from .api import register as _register_api  # noqa: E402  (dllama-mpi api)
_register_api(main)

from .benchmark import register as _register_benchmark  # noqa: E402  (dllama-mpi benchmark)
_register_benchmark(main)

if __name__ == "__main__":
    main()
