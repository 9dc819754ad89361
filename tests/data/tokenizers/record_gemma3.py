"""Regenerate gemma3_llamacpp_tokenize.json: llama.cpp's token ids for Gemma 3 on texts that exercise
every part of its SentencePiece tokenizer (tests/test_gemma3.py asserts dllama-mpi's ids equal them).

    python3 tests/data/tokenizers/record_gemma3.py LLAMA_TOKENIZE GGUF

LLAMA_TOKENIZE: llama.cpp's llama-tokenize (scripts/gemma3_llamacpp.sh builds it); GGUF: the
google/gemma-3-270m Q4_K_M GGUF (`dllama-mpi download gemma3-270m` leaves it in the model folder).
Each text goes through a file (`-f`, read verbatim, `--no-escape`), with the model's BOS unless the
case says otherwise, special tokens parsed unless the case says otherwise.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gemma3_llamacpp_tokenize.json")

# public domain: Jane Austen, Pride and Prejudice (1813), chapter I (tests/data/texts)
PARAGRAPH = ("It is a truth universally acknowledged, that a single man in possession\nof a good fortune "
             "must be in want of a wife.\n\nHowever little known the feelings or views of such a man may be "
             "on his\nfirst entering a neighbourhood, this truth is so well fixed in the minds\nof the "
             "surrounding families, that he is considered as the rightful\nproperty of some one or other "
             "of their daughters.")

# (group, text[, options]); options: parse_special (default True), add_bos (default True)
CASES = [
    ("ascii", "Hello world"),
    ("ascii", "Hello, world! How are you today?"),
    ("ascii", "The quick brown fox jumps over the lazy dog."),
    ("ascii", ""),
    ("ascii", "a"),
    ("ascii", "I'm sure they're fine, we've seen it, won't we?"),
    ("ascii", "UPPER lower MiXeD cAsE"),
    ("ascii", "e-mail: john.doe@example.com, https://www.example.org/path?q=1&x=y#frag"),
    ("ascii", PARAGRAPH),
    ("whitespace", " "),
    ("whitespace", "  leading spaces"),
    ("whitespace", "trailing spaces   "),
    ("whitespace", "double  space, triple   space"),
    ("whitespace", "tabs\tand\t\ttabs"),
    ("whitespace", "line1\nline2\n\nline4\n"),
    ("whitespace", "\n\n\n"),
    ("whitespace", " " * 40),
    ("whitespace", "a" + " " * 33 + "b"),
    ("whitespace", "\r\n windows \r\n line endings\r\n"),
    ("whitespace", "mixed \t \n  whitespace \n\t "),
    ("whitespace", "\u00a0non-breaking\u00a0space"),
    ("whitespace", "\u3000ideographic\u3000space"),
    ("whitespace", "\n" * 35 + "x"),
    ("code", "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\nprint(add(1, 2))\n"),
    ("code", "int main(void) {\n\tfor (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\n\treturn 0;\n}"),
    ("code", '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}'),
    ("code", "<table><tr><td>cell</td></tr></table>"),
    ("code", "<b>bold</b> <i>it</i> <s>strike</s> <h1>Title</h1>"),
    ("code", "for f in *.txt; do echo \"$f\" | sed -e 's/a/b/g' >> out.log; done"),
    ("code", "    indented\n        deeper\n            deepest"),
    ("code", "x = [i**2 for i in range(10) if i % 2 == 0]  # squares"),
    ("cjk", "日本語のテキストです。"),
    ("cjk", "中文分词测试，你好世界！"),
    ("cjk", "한국어 문장입니다."),
    ("cjk", "漢字とカタカナとひらがな"),
    ("cjk", "東京は日本の首都です。 北京是中国的首都。"),
    ("emoji", "😀😃😄"),
    ("emoji", "👍🏽 thumbs up"),
    ("emoji", "👨\u200d👩\u200d👧\u200d👦 family"),
    ("emoji", "🇫🇷🇯🇵 flags"),
    ("emoji", "I ❤️ 🍕 and ☕!"),
    ("byte-fallback", "\x01\x02\x03"),
    ("byte-fallback", "\ue000\uf8ff private use"),
    ("byte-fallback", "\U0010fffd\U000f0000"),
    ("byte-fallback", "\x7f\x1b[0m"),
    ("byte-fallback", "\U00020000\U00020001\U0002a6d6"),
    ("byte-fallback", "\u200b\u200d\ufeff"),
    ("byte-fallback", "a\u0301 e\u0308 combining"),
    ("byte-fallback", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏"),
    ("special", "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"),
    ("special", "<bos>text<eos>"),
    ("special", "<start_of_turn><start_of_turn>"),
    ("special", "<unused0> <unused99> <unused6241>"),
    ("special", "<start_of_image> an image [multimodal]"),
    ("special", "<mask> <pad> <unk>"),
    ("special", "not special: <start_of_turn and end_of_turn>"),
    ("special", "<0x41> is a byte token's name"),
    ("special", "\u2581literal meta space\u2581"),
    ("special", "<start_of_turn>user\nhi<end_of_turn>", {"parse_special": False}),
    ("special", "<b>bold</b>\n\n  x", {"parse_special": False}),
    ("special", "<bos>", {"parse_special": False}),
    ("special", "Hello world", {"add_bos": False}),
    ("special", "<start_of_turn>model\n", {"add_bos": False}),
    ("numbers", "1234567890"),
    ("numbers", "3.14159 2.71828"),
    ("numbers", "1,000,000 and 1.000.000"),
    ("numbers", "-42 +7 1e-10 0x1F"),
    ("numbers", "Year 2024, 12:30pm, 50%"),
    ("numbers", "٠١٢٣ ４５６ ⅠⅡⅢ"),
    ("mixed", "Привет мир"),
    ("mixed", "Ελληνικά κείμενο"),
    ("mixed", "مرحبا بالعالم"),
    ("mixed", "שלום עולם"),
    ("mixed", "हिन्दी पाठ"),
    ("mixed", "ไทย ภาษา"),
    ("mixed", "Ĉu vi parolas Esperanton? Ĝis!"),
    ("mixed", "Café naïve résumé façade"),
    ("mixed", "mixed English 日本語 русский 😀 123"),
]


def run(binary: str, gguf: str, text: str, parse_special: bool, add_bos: bool) -> list[int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(text.encode("utf-8"))
    try:
        args = [binary, "-m", gguf, "-f", f.name, "--ids", "--no-escape", "--log-disable"]
        if not parse_special:
            args.append("--no-parse-special")
        if not add_bos:
            args.append("--no-bos")
        r = subprocess.run(args, capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    binary, gguf = sys.argv[1], sys.argv[2]
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stderr.strip().splitlines()
    cases = []
    for case in CASES:
        group, text = case[0], case[1]
        opts = {"parse_special": True, "add_bos": True, **(case[2] if len(case) > 2 else {})}
        ids = run(binary, gguf, text, **opts)
        cases.append({"group": group, "text": text, **opts, "ids": ids})
    out = {"recorded_with": {"llama.cpp": version[:2], "gguf": os.path.basename(gguf)},
           "how": "tests/data/tokenizers/record_gemma3.py (llama-tokenize -f FILE --ids --no-escape)",
           "cases": cases}
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
