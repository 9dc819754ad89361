"""`convert` click group: `convert hf FOLDER ...` and `convert gguf FILE ...`.

The main `dllama-mpi` group attaches it (`main.add_command(convert)`); no console script of its own.
Errors are ConvertError (a DllamaError): the main CLI prints them as one line.
"""

from __future__ import annotations

import os
import sys
import time

import click

from dllama_mpi.startup import one_line

WEIGHT_CHOICES = ["q40", "q80", "f16", "f32"]


def _weights_option(auto: bool):
    if auto:
        return click.option("--weights", type=click.Choice(["auto", "native"] + WEIGHT_CHOICES, case_sensitive=False),
                            default="auto", show_default=True,
                            help="Float type of the weight matrices; auto keeps each GGUF tensor's quality in "
                                 "Distributed Llama's types (Q8_0 -> q80 and Q4_0 -> q40 copied, F16/BF16 -> f16, "
                                 "F32 -> f32, other types -> q80); native keeps every tensor's GGUF type block for "
                                 "block (a .m only dllama-mpi reads, dllama_mpi/FORMATS-EXT.md). Running the GGUF "
                                 "itself needs no conversion: --model FILE.gguf.")
    return click.option("--weights", type=click.Choice(WEIGHT_CHOICES, case_sensitive=False), default="q40",
                        show_default=True, help="Float type of the weight matrices.")


def _common(fn):
    opts = [
        click.option("--out-model", "out_model", type=click.Path(dir_okay=False), default=None,
                     help="Output .m model file (omit to skip the model)."),
        click.option("--out-tokenizer", "out_tokenizer", type=click.Path(dir_okay=False), default=None,
                     help="Output .t tokenizer file (omit to skip the tokenizer)."),
        click.option("--quiet", is_flag=True, help="No progress bar or summary."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _report(quiet, what, h, t, out_model, out_tokenizer, t0):
    if quiet:
        return
    if h is not None:
        click.echo(f"{out_model}: {h.arch_name} dim {h.dim} hidden {h.hidden_dim} layers {h.n_layers} heads "
                   f"{h.n_heads}/{h.n_kv_heads} vocab {h.vocab_size} {h.weights_name}, "
                   f"{os.path.getsize(out_model)} bytes", err=True)
    if t is not None:
        click.echo(f"{out_tokenizer}: {t.vocab_size} tokens, bos {t.bos_id}, eos {t.eos_ids}, add_bos "
                   f"{int(t.add_bos)}, chat template {'yes' if t.chat_template else 'no'}", err=True)
    click.echo(f"converted {what} in {time.time() - t0:.1f} s", err=True)


def _check_outputs(out_model, out_tokenizer):
    if out_model is None and out_tokenizer is None:
        raise click.UsageError("give --out-model and/or --out-tokenizer")


@click.group("convert")
def convert():
    """Convert Hugging Face folders or GGUF files to Distributed Llama .m / .t files."""


@convert.command("hf")
@click.argument("folder", type=click.Path(readable=False))   # checked by the converter: one 'error:' line
@_common
@_weights_option(auto=False)
@one_line(interrupted=None)
def hf_cmd(folder, out_model, out_tokenizer, weights, quiet):
    """Convert a Hugging Face model FOLDER (config.json, *.safetensors, tokenizer.json)."""
    from .hf import convert_hf

    _check_outputs(out_model, out_tokenizer)
    t0 = time.time()
    h, t = convert_hf(folder, out_model, out_tokenizer, weights.lower(), quiet)
    _report(quiet, folder, h, t, out_model, out_tokenizer, t0)


@convert.command("gguf")
@click.argument("file", type=click.Path(readable=False))
@_common
@_weights_option(auto=True)
@click.option("--q40-method", type=click.Choice(["auto", "dllama", "rmse"]), default="auto", show_default=True,
              help="q40 encoder: dllama = Distributed Llama's rule; rmse = error-minimizing scale search; "
                   "auto = rmse for tensors the GGUF already stores quantized, dllama for float ones.")
@one_line(interrupted=None)
def gguf_cmd(file, out_model, out_tokenizer, weights, quiet, q40_method):
    """Convert a GGUF FILE (llama / qwen2 / qwen3 / qwen3moe / gemma3 architecture, any tensor type) to .m / .t
    files. Not needed to run it: every command takes --model FILE.gguf."""
    from .gguf import convert_gguf

    _check_outputs(out_model, out_tokenizer)
    t0 = time.time()
    h, t = convert_gguf(file, out_model, out_tokenizer, weights.lower(), quiet, q40_method)
    _report(quiet, file, h, t, out_model, out_tokenizer, t0)


def main(argv=None):  # for `python -m dllama_mpi.convert.cli` during development
    from dllama_mpi.errors import DllamaError

    try:
        convert.main(args=argv, standalone_mode=False)
    except DllamaError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
