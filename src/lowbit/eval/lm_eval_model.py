"""lm-evaluation-harness model `lowbit`: any lm-eval task on any lowbit artifact, through lowbit's own forward.

    lowbit-lm-eval --model lowbit --model_args artifact=PATH --device cpu --tasks NAME [--include_path DIR]

PATH is a lowbit checkpoint, a .gguf file (its exact dequantization), an exported compressed-tensors / GPTQ /
AWQ folder (lowbit's exact reader of its codes) or an FP Hugging Face folder, so FP and quantized models are
scored by the same code. Every number comes from the layer-at-a-time forward that lowbit's KLD, PPL and task
scores use (`lowbit.eval.mc.continuation_logprobs`), in float32.

Why a wrapper command: lm-eval 0.4.13 fills its model registry only from its own table
(`lm_eval/models/__init__.py`) and from `@register_model` in modules that are already imported; it scans no
entry-point group and its CLI has no option to import a plugin. So `lm_eval --model lowbit` cannot find this
class. `lowbit-lm-eval` (or `python -m lowbit.eval.lm_eval_model`) registers it and then runs lm-eval's own
CLI with the same arguments; in Python, `import lowbit.eval.lm_eval_model` before `lm_eval.simple_evaluate(
model="lowbit", ...)` does the same.

Model args (`--model_args k=v,...`):
  artifact=PATH         required (`pretrained=` is accepted as an alias)
  tokenizer=PATH        HF folder whose tokenizer to use; default: the artifact's own tokenizer files, else
                        the source model it records; for a GGUF, the vocabulary inside the file
  max_length=N          context length (default: config max_position_embeddings, as lm-eval's hf model)
  add_bos_token=BOOL    as lm-eval's hf model (default: the tokenizer's own setting)
  prefix_token_id=N     the token an empty context is scored after (default BOS, else EOS)
  cache_weights=auto|true|false   keep dequantized layers in memory between calls (auto: models < 2 GiB fp32)
  emulate_runtime=BOOL  GGUF only: round matmul inputs as llama.cpp's CPU kernels do
  max_gen_toks=N        default generation budget when a task sets none (256)
Tokenization, truncation and rolling windows follow lm-eval's `hf` model, so both give the same requests.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from lowbit.errors import LowbitError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - a one-line hint instead of a traceback
    raise LowbitError("lm-eval is not installed; run `pip install 'lowbit[lmeval]'` "
                      "(lm-eval==0.4.13, pin torch==2.13.0 on the same line)") from None

log = logging.getLogger(__name__)

MODEL_NAME = "lowbit"
CACHE_AUTO_BYTES = 2 << 30
GEN_BUCKET = 64  # sequences per padded bucket while generating
ACCEPTED_ARGS = ("artifact", "tokenizer", "max_length", "add_bos_token", "prefix_token_id", "cache_weights",
                 "emulate_runtime", "max_gen_toks")


def register() -> None:
    """Make `lowbit` a model name of lm-eval's registry (idempotent; lm-eval's own models stay available)."""
    import lm_eval.models  # noqa: F401  fills the registry; get_model() skips this once it is non-empty
    from lm_eval.api.registry import model_registry

    target = f"{__name__ if __name__ != '__main__' else 'lowbit.eval.lm_eval_model'}:LowbitLM"
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=target)


# ---------------------------------------------------------------- opening an artifact


def open_artifact(path: Path, emulate_runtime: bool = False):
    """(WeightSource, kind) for a lowbit checkpoint, .gguf, HF export or FP HF folder."""
    from lowbit.eval.compare import artifact_kind

    if not path.exists():
        raise LowbitError(f"{path}: not found; pass artifact=PATH of a lowbit checkpoint, a .gguf file, an exported "
                          "compressed-tensors/GPTQ/AWQ folder or an FP Hugging Face folder")
    try:
        kind = artifact_kind(path)
    except LowbitError:
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise LowbitError(f"{path}: not a model lowbit reads; pass a lowbit checkpoint, a .gguf file, an "
                              "exported compressed-tensors/GPTQ/AWQ folder or an FP Hugging Face folder") from None
        kind = "fp"
    if emulate_runtime and kind != "gguf":
        raise LowbitError(f"{path}: emulate_runtime applies to .gguf files only; drop it from --model_args")
    if kind == "lowbit":
        from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

        return LowbitCheckpoint(path), kind
    if kind == "gguf":
        from lowbit.formats.gguf import GGUFWeights

        return GGUFWeights(path, emulate_runtime=emulate_runtime), kind
    if kind == "hf-export":
        from lowbit.formats.hf_export import HFExport

        return HFExport(path), kind
    from lowbit.eval.compare import PACKED_KINDS

    if kind in PACKED_KINDS:  # bitsandbytes, AQLM, MLX, FP8 folders: their own readers
        from lowbit.eval.compare import open_artifact as open_packed

        return open_packed(path), kind
    from lowbit.model.forward import FolderWeights
    from lowbit.model.hf import ModelFolder

    return FolderWeights(ModelFolder(path)), kind


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def open_tokenizer(path: Path, kind: str, tokenizer: str | None):
    """The HF tokenizer for an artifact: tokenizer=PATH, else its own files, else its recorded source model;
    a GGUF's vocabulary is rebuilt from the file when no folder is given."""
    from lowbit.eval.compare import artifact_source
    from lowbit.eval.data import load_tokenizer

    if tokenizer:
        folder = Path(tokenizer)
        if not _has_tokenizer(folder):
            raise LowbitError(f"{folder}: no tokenizer.json or tokenizer.model there; pass tokenizer=HF_FOLDER "
                              "of the model the artifact was made from")
        return load_tokenizer(folder)
    if kind == "gguf":
        return _gguf_tokenizer(path)
    if _has_tokenizer(path):
        return load_tokenizer(path)
    src = artifact_source(path)
    if src and _has_tokenizer(Path(src)):
        return load_tokenizer(Path(src))
    raise LowbitError(f"{path}: no tokenizer files and no recorded source model that has them; pass "
                      "tokenizer=HF_FOLDER in --model_args")


def _gguf_tokenizer(path: Path):
    from lowbit.eval.data import load_tokenizer
    from lowbit.formats.gguf import gguf_tokenizer_files, open_gguf

    try:
        files = gguf_tokenizer_files(open_gguf(path), path)
    except LowbitError as exc:
        raise LowbitError(f"{exc}; pass tokenizer=HF_FOLDER (the model the GGUF was made from) in --model_args") \
            from None
    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-tok-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        try:
            return load_tokenizer(Path(tmp))
        except LowbitError:
            raise LowbitError(f"{path}: its vocabulary cannot be loaded as a tokenizer; pass tokenizer=HF_FOLDER "
                              "(the model the GGUF was made from) in --model_args") from None


class MemoWeights:
    """A WeightSource that keeps what it has read (dequantized layers included), for repeated passes."""

    def __init__(self, source):
        self.source = source
        self.spec = source.spec
        self.config = source.config
        self.head_act_quant = getattr(source, "head_act_quant", None)
        self._layers: dict[int, dict] = {}
        self._other: dict[str, torch.Tensor] = {}

    def layer(self, i: int) -> dict:
        if i not in self._layers:
            self._layers[i] = self.source.layer(i)
        return self._layers[i]

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._other:
            self._other[name] = getattr(self.source, name)()
        return self._other[name]

    def embedding(self) -> torch.Tensor:
        return self._get("embedding")

    def final_norm(self) -> torch.Tensor:
        return self._get("final_norm")

    def lm_head(self) -> torch.Tensor:
        return self._get("lm_head")


def fp32_bytes(spec) -> int:
    """Bytes of the model's weights in float32 (what a fully dequantized copy holds)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size
    emb = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return 4 * (spec.num_layers * per_layer + emb)


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise LowbitError(f"--model_args {name}={value}: expected true or false")


def _int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LowbitError(f"--model_args {name}={value}: expected an integer") from None
    if n < 1:
        raise LowbitError(f"--model_args {name}={value}: must be at least 1")
    return n


# ---------------------------------------------------------------- the lm-eval model


class LowbitLM(TemplateLM):
    """lm-eval's LM interface over a lowbit WeightSource (float32, CPU)."""

    backend = "causal"

    def __init__(self, artifact: str | None = None, pretrained: str | None = None, tokenizer: str | None = None,
                 max_length: int | None = None, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, cache_weights: Any = "auto", emulate_runtime: Any = False,
                 max_gen_toks: int = 256, batch_size: Any = None, max_batch_size: Any = None,
                 device: str | None = None, trust_remote_code: Any = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise LowbitError(f"--model_args {', '.join(sorted(unknown))}: not an option of the lowbit model "
                              f"(it takes {', '.join(ACCEPTED_ARGS)}); pass the device as --device cpu")
        if device not in (None, "cpu"):
            raise LowbitError(f"--device {device}: the lowbit model runs lowbit's own CPU forward pass; "
                              "pass --device cpu")
        if trust_remote_code is not None:  # lm-eval's own flag: lets an auto_map config through, runs no code
            from lowbit.model.arch import trust_remote_code as allow_remote_code

            allow_remote_code(_bool(trust_remote_code, "trust_remote_code"))
        artifact = artifact or pretrained
        if not artifact:
            raise LowbitError("the lowbit model needs --model_args artifact=PATH (a lowbit checkpoint, a .gguf "
                              "file, an exported HF folder or an FP HF folder)")
        self.artifact = Path(str(artifact)).expanduser()
        source, self.kind = open_artifact(self.artifact, _bool(emulate_runtime, "emulate_runtime"))
        cache = (fp32_bytes(source.spec) < CACHE_AUTO_BYTES if str(cache_weights).lower() == "auto"
                 else _bool(cache_weights, "cache_weights"))
        self.source = MemoWeights(source) if cache else source
        self.spec = source.spec
        self.tokenizer = open_tokenizer(self.artifact, self.kind, tokenizer)
        if self.tokenizer.vocab_size > self.spec.vocab_size:
            raise LowbitError(f"{self.artifact}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {self.spec.vocab_size}; pass tokenizer=HF_FOLDER of the model it "
                              "was made from")
        self.add_bos_token = None if add_bos_token is None else _bool(add_bos_token, "add_bos_token")
        self._max_length = _int(max_length, "max_length") if max_length is not None else None
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks")
        self._device = "cpu"
        self.batch_size = batch_size  # recorded for lm-eval's report; lowbit groups requests itself

    # -- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.spec.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.artifact).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"lowbit_artifact": str(self.artifact), "lowbit_kind": self.kind, "model_dtype": "float32"}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's hf model: the tokenizer's default special tokens unless add_bos_token or the caller
        says otherwise, and none when the text already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring

    def _score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str,
               disable_tqdm: bool) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        from lowbit.eval.mc import continuation_logprobs

        bar = tqdm(total=len(requests), desc=desc, disable=disable_tqdm)
        done = [0]

        def on_chunk(n: int, total: int) -> None:
            target = len(requests) * n // total
            bar.update(target - done[0])
            done[0] = target

        try:
            return continuation_logprobs(self.source, requests, on_chunk=on_chunk)
        finally:
            bar.close()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each ((context, continuation), context ids, continuation ids), truncated from the left to the
        context length as lm-eval's hf model does: the input is (context + continuation)[-(max_length+1):][:-1]."""
        cut = []
        for _, ctx, cont in requests:
            if not cont:
                raise LowbitError("a continuation tokenizes to zero tokens; fix the task's doc_to_choice "
                                  "(every choice needs at least one token)")
            if len(cont) > self.max_length:
                raise LowbitError(f"a continuation of {len(cont)} tokens is longer than max_length "
                                  f"{self.max_length}; raise --model_args max_length")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            cut.append((whole[:-len(cont)], whole[-len(cont):]))
        results = self._score(cut, "lowbit loglikelihood", disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of the model's context, each token scored once
        (lm-eval's rolling windows, prefix token first); all windows of all texts share one pass."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = self._score(windows, "lowbit loglikelihood_rolling", disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, EOS or max_gen_toks, requests with the same generation
        arguments decoded together. Each step recomputes the whole forward (no KV cache): cost grows with
        max_gen_toks x sequence length, so keep generation tasks small on CPU."""
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm

        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(args)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(args), desc="lowbit generate_until", disable=disable_tqdm)
        for idxs in groups.values():
            kw = normalize_gen_kwargs(dict(args[idxs[0]][1]), self.max_gen_toks)
            until = [s for s in (kw.get("until") or []) if s]
            if eos and eos not in until:
                until.append(eos)
            max_gen = int(kw["max_gen_toks"])
            if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0:
                log.warning("lowbit model: sampling was requested (%s); decoding greedily", kw)
            budget = self.max_length - max_gen
            if budget < 1:
                raise LowbitError(f"max_gen_toks {max_gen} leaves no room for a context in max_length "
                                  f"{self.max_length}; lower max_gen_toks or raise --model_args max_length")
            contexts = [self.tok_encode(args[i][0], left_truncate_len=budget) for i in idxs]
            for i, text in zip(idxs, self._greedy(contexts, until, max_gen)):
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(1)
        bar.close()
        return out

    @torch.inference_mode()
    def _greedy(self, contexts: list[list[int]], until: list[str], max_gen: int) -> list[str]:
        from lowbit.model.forward import run_layers_ragged

        seqs = [list(c) if c else [self.prefix_token_id] for c in contexts]
        gen: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        head = self.source.lm_head()
        head_act = getattr(self.source, "head_act_quant", None)
        for _ in range(max_gen):
            if not active:
                break
            active.sort(key=lambda j: -len(seqs[j]))
            buckets = [active[s:s + GEN_BUCKET] for s in range(0, len(active), GEN_BUCKET)]
            tensors = []
            for b in buckets:
                t = torch.zeros(len(b), len(seqs[b[0]]), dtype=torch.long)
                for r, j in enumerate(b):
                    t[r, :len(seqs[j])] = torch.tensor(seqs[j])
                tensors.append(t)
            hidden = run_layers_ragged(self.source, tensors)
            still = []
            for b, h in zip(buckets, hidden):
                last = torch.stack([h[r, len(seqs[j]) - 1] for r, j in enumerate(b)])
                nxt = ((last if head_act is None else head_act(last)) @ head.T).argmax(-1).tolist()
                for j, tok in zip(b, nxt):
                    seqs[j].append(tok)
                    gen[j].append(tok)
                    text = self.tok_decode(gen[j], skip_special_tokens=False)
                    if tok != self.eot_token_id and not any(s in text for s in until):
                        still.append(j)
            active = still
        results = []
        for g in gen:
            text = self.tok_decode(g)
            for s in until:
                text = text.split(s)[0]
            results.append(text)
        return results


register()


def main(argv: list[str] | None = None) -> None:
    """`lowbit-lm-eval ARGS`: lm-eval's own CLI (same arguments) with the `lowbit` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from lowbit.eval.lm_eval_model import main as _main  # the registered module, not this __main__ copy

    _main()
