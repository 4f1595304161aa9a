"""A HF tokenizer as GGUF vocabulary metadata, the way llama.cpp's runtime needs it.

Two tokenizer models exist in llama.cpp for the Llama family:

  gpt2   byte-level BPE (Llama 3.x, Qwen2/2.5/3, SmolLM, Mistral Nemo's tekken): tokens, token types,
         merges, and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp must apply before
         merging. That name is the one thing the HF files do not state.
  llama  SentencePiece (Llama 2, Mistral 7B, TinyLlama): tokens, scores and token types from
         tokenizer.model (or from a byte-fallback BPE tokenizer.json when there is no .model).

Naming the pre-tokenizer: llama.cpp's converter hashes the ids of a probe text and looks the hash up in
a table of known tokenizers. lowbit asks a question that does not need the table to know the model:
*which llama.cpp pre-tokenizer splits text exactly as this tokenizer's own pre-tokenizer does?* The
HF pre-tokenizer (normalizer, Split, ByteLevel, Digits, ...) is run on a probe text of awkward cases
(contractions in every case, digit runs, whitespace runs, CJK, Cyrillic, emoji, code), and so is each
candidate's regex sequence from llama.cpp (data/llamacpp_pretokenizers.json); the first candidate
whose split points are identical is the name written. A tokenizer no candidate reproduces is refused
before any quantization work, with its name, instead of giving a GGUF that tokenizes differently.

Special tokens, add_bos/add_eos, merges and the chat template are read by the gguf package's own
SpecialVocab, so they follow the rules llama.cpp's tooling uses (tokenizer_config.json first, then
config.json; the post-processor decides add_bos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Every case on which llama.cpp's pre-tokenizers disagree with each other somewhere.
PROBE_TEXT = (
    "Hello World! It's, we'RE, they'Ve, I'M, you'D, she'LL, don't 'tis.\n"
    "1 12 123 1234 12345 123456 1234567 3.14 2,000,000 x1y22z333\n"
    "\t tab\t\tand  two   three    spaces\n\n\n   \n leading\r\nwindows\r\n"
    "Привет, мир! Ελληνικά. 日本語のテキスト、中文字符和English混合。한국어 텍스트 ～ ៣ ខ្មែរ\n"
    "emoji 🙂🙃 👩‍👩‍👧 ✨!!! ??? ... --- === ''' \"\"\" ``` ___\n"
    "def f(x_1, *args): return {'a': [1, 2.5e-3]} // C++ i++ <tag attr=\"v\">&amp;</tag> a/b\\c\n"
    "CamelCaseWord lowercase UPPERCASE MiXeD McDonald's O'Neil l'été naïve café\n"
)


@dataclass(frozen=True)
class PreTokenizer:
    name: str
    regexes: tuple[str, ...]
    adds_bos: bool | None  # llama-bpe vs smaug-bpe: the same split, told apart by whether BOS is added


@lru_cache(maxsize=1)
def llamacpp_pretokenizers() -> tuple[PreTokenizer, ...]:
    doc = json.loads(resources.files("lowbit.formats").joinpath("data/llamacpp_pretokenizers.json").read_text())
    return tuple(PreTokenizer(p["name"], tuple(p["regexes"]), p.get("adds_bos")) for p in doc["pre_tokenizers"])


def llamacpp_split(text: str, regexes: tuple[str, ...]) -> list[tuple[int, int]]:
    """Spans llama.cpp's BPE pre-tokenizer cuts `text` into: each regex in turn splits every piece the
    previous ones left into its matches and the gaps between them."""
    import regex

    pieces = [(0, len(text))]
    for pattern in regexes:
        compiled = regex.compile(pattern)
        nxt = []
        for start, end in pieces:
            pos = start
            for m in compiled.finditer(text, start, end):
                if m.start() == m.end():
                    continue
                if m.start() > pos:
                    nxt.append((pos, m.start()))
                nxt.append((m.start(), m.end()))
                pos = m.end()
            if pos < end:
                nxt.append((pos, end))
        pieces = nxt
    return pieces


def hf_split(tokenizer: Any, text: str) -> list[tuple[int, int]] | None:
    """Spans the HF tokenizer's normalizer + pre-tokenizer cut `text` into (None: it changed the text)."""
    normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
    if normalized != text or tokenizer.pre_tokenizer is None:
        return None
    return [span for _, span in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def identify_pre_tokenizer(tokenizer_json: Path, adds_bos: bool) -> str:
    """The llama.cpp pre-tokenizer name whose splits equal this tokenizer's on the probe text."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise LowbitError(f"{tokenizer_json}: the tokenizers library cannot load it ({_one_line(exc)}); fix or "
                          "re-download it") from None
    theirs = hf_split(tok, PROBE_TEXT)
    for cand in llamacpp_pretokenizers() if theirs is not None else ():
        if cand.adds_bos is not None and cand.adds_bos != adds_bos:
            continue
        if llamacpp_split(PROBE_TEXT, cand.regexes) == theirs:
            return cand.name
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    raise LowbitError(f"{tokenizer_json}: its pre-tokenizer {kinds} splits text like none of llama.cpp's "
                      "pre-tokenizers, so llama.cpp would tokenize differently; GGUF export is not possible "
                      "for this tokenizer (export to --format compressed-tensors/gptq/awq instead)")


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp treats as control tokens even when not flagged special (<|im_end|>, ...)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or text.startswith("<unused"))


@dataclass
class GGUFVocab:
    """Everything written under tokenizer.* of a GGUF."""

    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab: merges, special ids, add_* flags, chat template
    add_space_prefix: bool | None = None

    @property
    def chat_template(self) -> str | None:
        t = self.special.chat_template
        return t if isinstance(t, str) else None

    def write(self, w: Any) -> None:
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        self.special.add_to_gguf(w, quiet=True)


def read_vocab(folder: Path, vocab_size: int, llama_graph: bool) -> GGUFVocab:
    """The GGUF vocabulary of HF folder `folder` for a model with `vocab_size` embedding rows.

    `llama_graph`: the arch is llama.cpp's "llama" graph, whose converter also writes add_space_prefix.
    """
    folder = Path(folder)
    tcfg = _json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.model").is_file() and _is_sentencepiece(folder / "tokenizer.model"):
        vocab = _sentencepiece_vocab(folder, vocab_size, tcfg)
    elif (folder / "tokenizer.json").is_file():
        vocab = _tokenizer_json_vocab(folder, vocab_size)
    else:
        raise LowbitError(f"{folder}: no tokenizer.json or SentencePiece tokenizer.model; a GGUF needs the "
                          "model's tokenizer (copy it from the original model folder)")
    if llama_graph and tcfg.get("add_prefix_space") is not None:
        vocab.add_space_prefix = bool(tcfg["add_prefix_space"])
    return vocab


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
        raise LowbitError(f"{path}: invalid JSON ({str(exc)[:200]}); fix or re-download it") from None
    if not isinstance(doc, dict):
        raise LowbitError(f"{path}: must hold a JSON object; fix or re-download it")
    return doc


def _is_sentencepiece(path: Path) -> bool:
    """Llama 3's tokenizer.model is a tiktoken file, not a SentencePiece proto."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        return False
    return True


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _special_vocab(folder: Path, n_vocab: int, merges: bool, tokenizer_json: dict[str, Any] | None = None) -> Any:
    import gguf

    try:  # gguf-py reads tokenizer.json, tokenizer_config.json and config.json itself, trusting their layout
        special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes gguf-py raise
        raise LowbitError(f"{folder}: its special tokens or merges cannot be read ({_one_line(exc)}); fix or "
                          "re-download tokenizer.json and tokenizer_config.json") from None
    # A ByteLevel post-processor adds neither BOS nor EOS: llama.cpp's own copy of gguf-py records both
    # as False (the gguf 0.19.0 release on PyPI leaves them unset, and llama.cpp would then default them).
    tj = _json(folder / "tokenizer.json") if tokenizer_json is None else tokenizer_json
    post = tj.get("post_processor") or {}
    steps = post.get("processors", [post]) if isinstance(post, dict) else []
    if any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in steps if isinstance(steps, list)):
        for typ in ("bos", "eos"):
            special.add_special_token.setdefault(typ, False)
    return special


def _check_fits(n_tokens: int, vocab_size: int, where: Path) -> None:
    if n_tokens > vocab_size:
        raise LowbitError(f"{where}: the tokenizer has {n_tokens} tokens but config.json's vocab_size is "
                          f"{vocab_size}; the tokenizer does not belong to this model")


def _tokenizer_json_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    tj_path = folder / "tokenizer.json"
    tj = _json(tj_path)
    model = tj.get("model") if isinstance(tj.get("model"), dict) else {}
    if model.get("type") != "BPE":
        raise LowbitError(f"{tj_path}: tokenizer type {str(model.get('type'))[:40]!r} has no llama.cpp GGUF form "
                          "(byte-level BPE or SentencePiece only)")
    if model.get("byte_fallback"):
        return _llama_hf_vocab(folder, vocab_size)
    vocab, added = model.get("vocab"), tj.get("added_tokens", [])
    if not (isinstance(vocab, dict) and vocab and all(_token_id(i) for i in vocab.values())
            and isinstance(added, list) and all(isinstance(a, dict) and _token_id(a.get("id"))
                                                and isinstance(a.get("content"), str) for a in added)):
        raise LowbitError(f"{tj_path}: its vocabulary is malformed (model.vocab must map tokens to ids, and each "
                          "added token needs an id and its content); fix or re-download it")
    added = {a["id"]: a for a in added}
    by_id = {i: t for t, i in vocab.items()} | {i: a["content"] for i, a in added.items()}
    _check_fits(max(by_id) + 1, vocab_size, tj_path)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            text = added[i]["content"]
            special = added[i].get("special") or looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    special = _special_vocab(folder, len(tokens), merges=True, tokenizer_json=tj)
    pre = identify_pre_tokenizer(tj_path, adds_bos=bool(special.add_special_token.get("bos")))
    return GGUFVocab("gpt2", pre, tokens, types, None, special)


def _token_id(i: object) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def _llama_hf_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """A SentencePiece-style tokenizer.json (byte-fallback BPE, no tokenizer.model), through gguf's reader."""
    import gguf

    tokens, scores, types = [], [], []
    try:  # gguf-py's reader trusts the file's layout
        for text, score, ttype in gguf.LlamaHfVocab(folder).all_tokens():
            tokens.append(text.decode("utf-8"))
            scores.append(score)
            types.append(int(ttype))
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes gguf-py raise
        raise LowbitError(f"{folder / 'tokenizer.json'}: its byte-fallback vocabulary cannot be read "
                          f"({_one_line(exc)}); fix or re-download it") from None
    _check_fits(len(tokens), vocab_size, folder / "tokenizer.json")
    return GGUFVocab("llama", "default", tokens, types, scores, _special_vocab(folder, len(tokens), merges=False))


def _sentencepiece_vocab(folder: Path, vocab_size: int, tcfg: dict[str, Any]) -> GGUFVocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    _check_fits(sp.vocab_size(), vocab_size, folder / "tokenizer.model")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                    else BYTE if sp.is_byte(i) else NORMAL)
    # tokens added on top of the SentencePiece model (added_tokens.json, then tokenizer_config's decoder)
    for text, i in _json(folder / "added_tokens.json").items():
        if int(i) < vocab_size:
            tokens[int(i)], scores[int(i)], types[int(i)] = text, -1000.0, USER_DEFINED
    for key, a in (tcfg.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i >= vocab_size:
            continue
        special = a.get("special") or looks_special(a["content"])
        tokens[i] = a["content"] if special else a["content"].replace("\u2581", " ")
        scores[i], types[i] = -1000.0, CONTROL if special else USER_DEFINED
    return GGUFVocab("llama", "default", tokens, types, scores, _special_vocab(folder, len(tokens), merges=False))
