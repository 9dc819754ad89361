"""`dllama-mpi perplexity`: llama.cpp's perplexity and KL-divergence measurements, on any N ranks.

Exactly llama.cpp's method (tools/perplexity/perplexity.cpp, `perplexity()` and `kl_divergence()`):

- the whole file is tokenized at once, with BOS when the tokenizer adds one (special tokens in the
  text are not parsed), and cut into non-overlapping chunks of n_ctx tokens (at least 2 chunks'
  worth of tokens; `--chunks K` takes the first K);
- each chunk is one sequence from position 0; its first token is replaced by BOS when the tokenizer
  adds one;
- only the second half is scored: the logits at positions first = n_ctx/2 ... n_ctx-2 predict the
  tokens first+1 ... n_ctx-1 (n_ctx-1-first per chunk), nll = log(sum exp(l - max)) + max - l[tok];
- after each chunk `[i]ppl` is printed (ppl = exp(mean nll)), at the end
  `Final estimate: PPL = x +/- y`, y = ppl * sqrt((mean(nll²) - mean(nll)²) / (count - 1)).

`--kl-divergence-base FILE` with `--file` saves the reference: llama.cpp's own file format
("_logits_", n_ctx, n_vocab, n_chunk, the tokens, then per scored row the log-probabilities coded in
16 bits), so files are interchangeable with `llama-perplexity --kl-divergence-base` for the same
vocabulary. `--kl-divergence --kl-divergence-base FILE` re-evaluates the saved tokens and reports
what llama.cpp reports: PPL(Q), PPL(base), ln(PPL(Q)/PPL(base)), mean KLD, Δp, same top token.

How a chunk's logits are produced is `chunk_logits` alone (one sequence today; chunks as parallel
sequences once the engine batches sequences).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys

import click
import numpy as np

from .errors import ConfigError
from .startup import log, model_options, read_text_file, spmd, start

MAGIC = b"_logits_"


def chunk_logits(engine, tokens: list[int], first: int) -> np.ndarray:
    """Logits [len(tokens) - 1 - first, vocab] at positions first .. len-2 of one chunk, evaluated as
    one sequence from position 0 (positions >= 0 overwrite the KV cache rows of the previous chunk;
    attention reads only rows up to the current position)."""
    if first > 0:
        engine.forward(tokens[:first], 0, argmax=True)     # context only: no logits gathered
    return engine.forward(tokens[first:-1], first, all_logits=True)


# ------------------------------------------------------------------------------------------------
# llama.cpp's arithmetic, vectorised over the scored rows of a chunk

def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row (llama.cpp log_softmax: float max, double sum of expf)."""
    logits = np.asarray(logits, np.float32)
    m = logits.max(axis=1)
    s = np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)
    tok = logits[np.arange(len(targets)), targets].astype(np.float64)
    return m.astype(np.float64) + np.log(s) - tok


def nv_of(n_vocab: int) -> int:
    """uint16 entries per row of a base file: 2 floats (scale, min log-prob) + the codes, even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_log_probs(logits: np.ndarray) -> np.ndarray:
    """Rows of a base file (llama.cpp's log_softmax with a log_prob output): uint16 [rows, nv]."""
    logits = np.asarray(logits, np.float32)
    rows, n_vocab = logits.shape
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    min_log_prob = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    out = np.zeros((rows, nv_of(n_vocab)), np.uint16)
    head = np.stack([scale, min_log_prob], axis=1).astype(np.float32)
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.rint(inv[:, None] * (logits - mn[:, None]))           # nearest_int: ties to even
    codes = np.where(logits > mn[:, None], codes, 0)
    out[:, 4:4 + n_vocab] = codes.astype(np.uint16)
    return out


class KLD:
    """llama.cpp's kl_divergence_result: running sums over scored tokens."""

    def __init__(self):
        self.sum = dict.fromkeys(("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2",
                                  "p_diff", "p_diff2", "p_diff4"), 0.0)
        self.max_p_diff = 0.0
        self.same_top = 0
        self.count = 0
        self.kld_values: list[np.ndarray] = []
        self.p_diff_values: list[np.ndarray] = []

    def add(self, logits: np.ndarray, base: np.ndarray, targets: np.ndarray) -> None:
        logits = np.asarray(logits, np.float32)
        n_vocab = logits.shape[1]
        r = np.arange(len(targets))
        mx = logits.max(axis=1)
        imax = logits.argmax(axis=1)
        lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
        head = base[:, :4].copy().view(np.float32)
        scale, min_log_prob = head[:, 0], head[:, 1]
        codes = base[:, 4:4 + n_vocab].astype(np.float32)
        nll = (mx + lse - logits[r, targets]).astype(np.float32)
        nll_base = -(scale * codes[r, targets] + min_log_prob)
        p_log_base = scale[:, None] * codes + min_log_prob[:, None]
        keep = p_log_base > np.float32(-16)
        terms = np.where(keep, np.exp(p_log_base) * (p_log_base - logits + (mx + lse)[:, None]), 0)
        kld = terms.sum(axis=1, dtype=np.float64)
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        s = self.sum
        s["nll"] += float(nll.sum(dtype=np.float64)); s["nll2"] += float((nll.astype(np.float64) ** 2).sum())
        s["nll_base"] += float(nll_base.sum(dtype=np.float64))
        s["nll_base2"] += float((nll_base.astype(np.float64) ** 2).sum())
        s["nll_nll_base"] += float((nll.astype(np.float64) * nll_base).sum())
        s["kld"] += float(kld.sum()); s["kld2"] += float((kld ** 2).sum())
        pd = p_diff.astype(np.float64)
        s["p_diff"] += float(pd.sum()); s["p_diff2"] += float((pd ** 2).sum()); s["p_diff4"] += float((pd ** 4).sum())
        self.max_p_diff = max(self.max_p_diff, float(np.abs(p_diff).max()))
        self.same_top += int((imax == p_log_base.argmax(axis=1)).sum())
        self.count += len(targets)
        self.kld_values.append(kld)
        self.p_diff_values.append(pd)

    def mean_unc(self, a: str, b: str) -> tuple[float, float]:
        n = self.count
        if n < 1:
            return 0.0, 0.0
        f = self.sum[a] / n
        df = self.sum[b] / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def report(self) -> dict:
        n = self.count
        ln_q, ln_q_unc = self.mean_unc("nll", "nll2")
        ln_b, ln_b_unc = self.mean_unc("nll_base", "nll_base2")
        cov = 0.0 if n < 10 else (self.sum["nll_nll_base"] / n - ln_q * ln_b) / (n - 1)
        ratio_unc = math.sqrt(max(ln_q_unc ** 2 + ln_b_unc ** 2 - 2 * cov, 0.0))
        kld, kld_unc = self.mean_unc("kld", "kld2")
        mse, mse_unc = self.mean_unc("p_diff2", "p_diff4")
        top = self.same_top / n if n else 0.0
        values = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1)
        return {"tokens": n, "ppl": math.exp(ln_q), "ppl_unc": math.exp(ln_q) * ln_q_unc,
                "ppl_base": math.exp(ln_b), "ppl_base_unc": math.exp(ln_b) * ln_b_unc,
                "ln_ppl_ratio": ln_q - ln_b, "ln_ppl_ratio_unc": ratio_unc,
                "kld": kld, "kld_unc": kld_unc, "kld_median": float(np.median(values)), "kld_max": float(values[-1]),
                "kld_99": float(np.quantile(values, 0.99)),
                "p_diff_rms": math.sqrt(mse), "p_diff_rms_unc": 0.5 / math.sqrt(mse) * mse_unc if mse > 0 else 0.0,
                "p_diff_max": self.max_p_diff,
                "same_top": top, "same_top_unc": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0}


# ------------------------------------------------------------------------------------------------
# chunks

def chunk_tokens(tokens: list[int], ctx: int, chunks: int | None, where: str) -> int:
    """Number of chunks llama.cpp evaluates (needs at least 2 * ctx tokens)."""
    if len(tokens) < 2 * ctx:
        raise ConfigError(f"{where} tokenizes to only {len(tokens)} tokens; at least {2 * ctx} are needed "
                          f"for --ctx {ctx} (llama.cpp's rule: two chunks' worth)")
    n = len(tokens) // ctx
    return n if chunks is None or chunks < 0 else min(chunks, n)


def run_chunks(engine, tokens, ctx, n_chunk, bos):
    """Yield (chunk index, scored logits, their target tokens) for each chunk."""
    first = ctx // 2
    for i in range(n_chunk):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        targets = np.asarray(tokens[i * ctx + first + 1:(i + 1) * ctx], np.int64)
        yield i, chunk_logits(engine, chunk, first), targets


def read_base(path: str):
    """(n_ctx, n_vocab, n_chunk, tokens, file, offset of the first log-prob row) of a base file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the KL-divergence base file: {e.strerror}") from None
    head = f.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        f.close()
        raise ConfigError(f"{path}: not a file of base log-probabilities (no '_logits_' header)")
    n_ctx, n_vocab, n_chunk = struct.unpack("<3i", head[8:])
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        f.close()
        raise ConfigError(f"{path}: bad header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    rows = n_ctx - 1 - n_ctx // 2
    want = 20 + 4 * n_ctx * n_chunk + 2 * rows * nv_of(n_vocab) * n_chunk
    size = os.fstat(f.fileno()).st_size
    if size != want:
        f.close()
        raise ConfigError(f"{path}: file is {size} bytes, its header describes {want} (truncated?)")
    tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), "<i4").astype(np.int64)
    return n_ctx, n_vocab, n_chunk, tokens, f


# ------------------------------------------------------------------------------------------------
# the command

@click.command()
@model_options
@click.option("--file", "text_file", type=click.Path(readable=False), default=None,
              help="Text to evaluate (UTF-8).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (llama.cpp -c).")
@click.option("--chunks", type=int, default=None, help="Evaluate only the first K chunks [default: all].")
@click.option("--kl-divergence-base", "kld_base", type=click.Path(dir_okay=False), default=None,
              help="With --file: save the reference log-probabilities there (llama.cpp's format). "
                   "With --kl-divergence: read them.")
@click.option("--kl-divergence", "kld", is_flag=True,
              help="Compare with the saved reference (--kl-divergence-base): KLD, same top token, PPL ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document on stdout.")
@spmd
def perplexity(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load,
               max_batch, text_file, ctx, chunks, kld_base, kld, as_json):
    """Perplexity of a text (llama.cpp's method), or KL divergence against a saved reference."""
    base = None
    span = np.zeros(1, np.int64)
    if comm.is_root:
        if kld and kld_base is None:
            raise ConfigError("--kl-divergence needs --kl-divergence-base FILE (the saved reference)")
        if not kld and text_file is None:
            raise ConfigError("give --file TEXT (or --kl-divergence with --kl-divergence-base)")
        if kld:
            base = read_base(kld_base)
            ctx = base[0]
        elif ctx < 4:
            raise ConfigError(f"--ctx must be >= 4, got {ctx}")
        from .startup import resolve_model
        from .weights import open_model_file

        model_path, tokenizer_path = resolve_model(model_path, tokenizer_path)
        m = open_model_file(model_path)
        m.close()
        if ctx > m.header.max_seq_len:
            raise ConfigError(f"--ctx {ctx} is beyond the model's context ({m.header.max_seq_len})")
        span[0] = ctx
    if comm.size > 1:
        comm.bcast_array(span)          # every rank sizes its KV cache for one chunk
    ctx = int(span[0])
    # one chunk of KV cache is enough (unless --max-seq-len says otherwise)
    engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len or ctx,
                              sync_scheme, load, max_batch)
    if not comm.is_root:
        engine.serve()
        return
    out = sys.stderr if as_json else sys.stdout
    try:
        if ctx > engine.max_seq_len:
            raise ConfigError(f"--ctx {ctx} is beyond --max-seq-len {engine.max_seq_len}")
        bos = tokenizer.bos_id if tokenizer.add_bos else None
        if kld:
            result = _kl_divergence(engine, base, bos, chunks, kld_base, out)
        else:
            result = _perplexity(engine, tokenizer, text_file, ctx, chunks, bos, kld_base, out)
        result.update(ctx=ctx, nodes=comm.size, model=model_path)
        if as_json:
            print(json.dumps(result))
    finally:
        if base is not None:
            base[4].close()
        engine.stop_workers()


def _perplexity(engine, tokenizer, text_file, ctx, chunks, bos, kld_base, out) -> dict:
    text = read_text_file(text_file)
    if text.endswith("\n"):   # as llama.cpp's -f does: its numbers count the same tokens
        text = text[:-1]
    tokens = tokenizer.encode(text, parse_special=False)
    n_chunk = chunk_tokens(tokens, ctx, chunks, text_file)
    log(f"perplexity: {len(tokens)} tokens, {n_chunk} chunks of {ctx} (scoring the last {ctx - 1 - ctx // 2} of each)")
    save = None
    if kld_base is not None:
        save = open(kld_base + ".partial", "wb")
        save.write(MAGIC + struct.pack("<3i", ctx, engine.h.vocab_size, n_chunk))
        save.write(np.asarray(tokens[:n_chunk * ctx], "<i4").tobytes())
    nll = nll2 = 0.0
    count = 0
    running = []
    try:
        for i, logits, targets in run_chunks(engine, tokens, ctx, n_chunk, bos):
            v = nll_rows(logits, targets)
            nll += float(v.sum())
            nll2 += float((v * v).sum())
            count += len(v)
            running.append(math.exp(nll / count))
            print(f"[{i + 1}]{running[-1]:.4f},", end="", file=out, flush=True)
            if save is not None:
                save.write(encode_log_probs(logits).tobytes())
        print(file=out)
        if save is not None:
            save.close()
            os.replace(kld_base + ".partial", kld_base)
            save = None
    finally:
        if save is not None:
            save.close()
            os.unlink(kld_base + ".partial")
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 else float("nan")
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}", file=out, flush=True)
    return {"ppl": ppl, "ppl_unc": err, "chunks": n_chunk, "tokens": len(tokens), "scored": count,
            "running_ppl": running, "file": os.path.abspath(text_file)}


def _kl_divergence(engine, base, bos, chunks, path, out) -> dict:
    n_ctx, n_vocab, n_chunk, tokens, f = base
    if n_vocab != engine.h.vocab_size:
        raise ConfigError(f"{path}: base file has a vocabulary of {n_vocab}, the model {engine.h.vocab_size}")
    if chunks is not None and chunks >= 0:
        n_chunk = min(n_chunk, chunks)
    rows, nv = n_ctx - 1 - n_ctx // 2, nv_of(n_vocab)
    kl = KLD()
    print("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
          "Δp RMS            Same top p", file=out)
    for i, logits, targets in run_chunks(engine, tokens, n_ctx, n_chunk, bos):
        b = np.frombuffer(f.read(2 * rows * nv), np.uint16).reshape(rows, nv)
        kl.add(logits, b, targets)
        r = kl.report()
        print(f"{i + 1:4d}    {r['ppl']:9.4f} ± {r['ppl_unc']:9.4f}    {r['ln_ppl_ratio']:10.5f} ± "
              f"{r['ln_ppl_ratio_unc']:10.5f}    {r['kld']:10.5f} ± {r['kld_unc']:10.5f}    "
              f"{100 * r['p_diff_rms']:6.3f} ± {100 * r['p_diff_rms_unc']:6.3f} %    "
              f"{100 * r['same_top']:6.3f} ± {100 * r['same_top_unc']:6.3f} %", file=out, flush=True)
    r = kl.report()
    print(f"\nMean PPL(Q)                   : {r['ppl']:10.6f} ± {r['ppl_unc']:10.6f}\n"
          f"Mean PPL(base)                : {r['ppl_base']:10.6f} ± {r['ppl_base_unc']:10.6f}\n"
          f"Mean ln(PPL(Q)/PPL(base))     : {r['ln_ppl_ratio']:10.6f} ± {r['ln_ppl_ratio_unc']:10.6f}\n\n"
          f"====== KL divergence statistics ======\n"
          f"Mean    KLD: {r['kld']:10.6f} ± {r['kld_unc']:10.6f}\n"
          f"Maximum KLD: {r['kld_max']:10.6f}\n"
          f"99.0%   KLD: {r['kld_99']:10.6f}\n"
          f"Median  KLD: {r['kld_median']:10.6f}\n\n"
          f"====== Token probability statistics ======\n"
          f"RMS Δp    : {100 * r['p_diff_rms']:6.3f} ± {100 * r['p_diff_rms_unc']:6.3f} %\n"
          f"Same top p: {100 * r['same_top']:6.3f} ± {100 * r['same_top_unc']:5.3f} %", file=out, flush=True)
    r.update(chunks=n_chunk, base=os.path.abspath(path))
    return r


def register(group) -> None:
    group.add_command(perplexity)
