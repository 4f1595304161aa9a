"""Issue 15, hostile input: no code from model files, inputs stay untouched, one writer per output.

* No pickle anywhere in src/, benchmarks/ or tools/ (an AST scan of every Python file, a text scan of the
  shell scripts), and every transformers `from_pretrained` in src/ passes trust_remote_code=False (and,
  for a model, use_safetensors=True).
* A config.json with auto_map is refused with one line unless --trust-remote-code; with it lowbit
  proceeds and still never imports the named code.
* Names read from input files are never joined onto paths outside their folder: a safetensors index
  whose weight_map names `../x.safetensors` or an absolute path is refused. The GGUF reader and writer
  use tensor names only as dictionary keys and GGUF strings, never as paths (the only files a GGUF
  makes lowbit write are tokenizer files under fixed names), so there is nothing to refuse there.
* A read-only model folder survives quantize (lowbit checkpoint, GGUF, GPTQ) and eval unchanged: same
  listing, same bytes, same mtimes.
* A second process writing the same OUT (or its `.OUT.partial`) is refused with one line; the lock
  dies with its holder (SIGKILL) and the next run proceeds.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.errors import LowbitError

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("src", "benchmarks", "tools")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest real-tokenizer model the tests build (llama, SentencePiece, 2 layers of width 256)."""
    from families import build_family_model

    return build_family_model("llama-spm", tmp_path_factory.mktemp("hostile") / "llama-spm")


@pytest.fixture(scope="module")
def texts(eval_text: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(calibration, evaluation) texts of a few thousand tokens: tokenizing them takes no time."""
    root = tmp_path_factory.mktemp("texts")
    text = eval_text.read_text(encoding="utf-8")
    (root / "calib.txt").write_text(text[:20000], encoding="utf-8")
    (root / "eval.txt").write_text(text[-8000:], encoding="utf-8")
    return root / "calib.txt", root / "eval.txt"


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:"), (code, err)
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------- no pickle


def _source_files(ext: str) -> list[Path]:
    files = []
    for top in SCANNED:
        for p in sorted((REPO / top).rglob(f"*{ext}")) if (REPO / top).is_dir() else ():
            rel = p.relative_to(REPO)
            # virtual environments of the peer tools (benchmarks/.venvs) and caches are not our source
            if any(part.startswith(".") or part in ("__pycache__", "results") for part in rel.parts):
                continue
            files.append(p)
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return "?"


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# loaders that unpickle (or run TorchScript) whatever file they are given
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
                "cloudpickle.load", "cloudpickle.loads", "torch.jit.load", "marshal.load", "marshal.loads",
                "shelve.open", "torch.serialization.load"}
# Scripts that load a model through transformers exactly as a peer tool's users do. They run in the
# peers' own venvs on folders the benchmark wrote or lowbit's float32 safetensors model, never on a
# user's download, and transformers 5 reads a .bin only with torch.load(weights_only=True) anyway.
# The pickle rules above apply to them in full; only the use_safetensors/trust_remote_code keyword
# rule for from_pretrained is waived.
FROM_PRETRAINED_EXEMPT = ("benchmarks/",)


def pickle_findings(path: Path, rel: str | None = None) -> list[str]:
    """Every way `path` (at `rel` in the repository) could unpickle or import code from a model file."""
    rel = rel or path.relative_to(REPO).as_posix()
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            tail = name.rsplit(".", 1)[-1]
            if name in UNSAFE_CALLS:
                found.append(f"{where}: {name}(...)")
            elif name == "torch.load" and _kw(node, "weights_only") is not True:
                found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                found.append(f"{where}: {name}(allow_pickle=...)")
            elif tail == "from_pretrained" and not rel.startswith(FROM_PRETRAINED_EXEMPT):
                if _kw(node, "trust_remote_code") is not False:
                    found.append(f"{where}: {name} without trust_remote_code=False")
                receiver = name.rsplit(".", 1)[0]
                if "Model" in receiver and _kw(node, "use_safetensors") is not True:
                    found.append(f"{where}: {name} without use_safetensors=True (would read a pickled .bin)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and rel.startswith("src/"):
            # lowbit itself never names a pickled weight file
            if re.search(r"(pytorch_model[\w.-]*\.bin|\.(pt|pth|ckpt|pkl|pickle))$", node.value):
                found.append(f"{where}: names a pickled weight file {node.value!r}")
    return found


def test_no_pickle_in_source() -> None:
    """No torch.load without weights_only=True, no pickle/dill/joblib, no np.load(allow_pickle=True),
    no .bin/.pt weight file, no from_pretrained that could read a .bin or run a folder's own code."""
    py = _source_files(".py")
    assert len(py) > 50 and any(p.name == "hf.py" for p in py)  # the scan really walks the tree
    findings = [f for p in py for f in pickle_findings(p)]
    for sh in _source_files(".sh"):
        for n, line in enumerate(sh.read_text().splitlines(), 1):
            if re.search(r"\bpickle\b|torch\.load\(|allow_pickle\s*=\s*True", line):
                findings.append(f"{sh.relative_to(REPO)}:{n}: {line.strip()}")
    assert findings == []


def test_pickle_scan_catches_what_it_claims(tmp_path: Path) -> None:
    """The scan itself is not vacuous: each forbidden form in a file under src/ is reported."""
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport numpy as np\nimport torch\n"
                   "torch.load('w.pt')\ntorch.load('w', weights_only=False)\ntorch.load('ok', weights_only=True)\n"
                   "np.load('a.npy', allow_pickle=True)\nnp.load('b.npy')\npickle.loads(b'')\n"
                   "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                   "AutoModelForCausalLM.from_pretrained('x')\nAutoTokenizer.from_pretrained('x', trust_remote_code=False)\n"
                   "NAME = 'pytorch_model.bin'\n")
    got = pickle_findings(bad, "src/lowbit/probe.py")
    text = "\n".join(got)
    assert "import pickle" in text and "pickle.loads" in text and "allow_pickle" in text
    assert sum("torch.load without weights_only" in f for f in got) == 2
    assert "trust_remote_code=False" in text and "use_safetensors=True" in text and "pytorch_model.bin" in text
    assert len(got) == 9, got  # also the "w.pt" literal, and both missing keywords of the model load


# ---------------------------------------------------------------- auto_map


def _linked_copy(src: Path, dst: Path, config_update: dict | None = None) -> Path:
    """A model folder whose small files are copies (editable) and whose weights are symlinks."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("custom modelling code ran")
'''


def test_auto_map_needs_trust_remote_code(capsys, tmp_path: Path, tiny_model: Path, texts) -> None:
    marker = tmp_path / "code-ran"
    model = _linked_copy(tiny_model, tmp_path / "custom", {"auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}})
    for mod in ("configuration_evil.py", "modeling_evil.py"):
        (model / mod).write_text(EVIL.format(marker=str(marker)))
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out))
    one_line_error(code, err, str(model / "config.json"), "auto_map", "--trust-remote-code")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["custom"]
    code, _, err = run(capsys, "memory", "--config", str(model / "config.json"))
    one_line_error(code, err, "auto_map", "--trust-remote-code")

    # with the flag lowbit proceeds on its own forward, and the named code is never imported
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out), "--trust-remote-code")
    assert code == 0, err
    code, _, err = run(capsys, "eval", str(out), "--ref", str(model), "--eval-text", str(texts[1]), "--ctx", "64",
                       "--windows", "2", "--json", "--trust-remote-code")
    assert code == 0, err
    assert not marker.exists()
    # the flag lasts one command: the checkpoint carries the source config, auto_map included
    code, _, err = run(capsys, "eval", str(out), "--ref", str(model), "--eval-text", str(texts[1]))
    one_line_error(code, err, "auto_map")


# ---------------------------------------------------------------- names from inputs


def _tiny_model(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "tie_word_embeddings": True}
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    t = {"model.embed_tokens.weight": torch.randn(32, 64, generator=g), "model.norm.weight": torch.ones(64),
         p + "input_layernorm.weight": torch.ones(64), p + "post_attention_layernorm.weight": torch.ones(64)}
    for name, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("self_attn.v_proj", (32, 64)),
                        ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)),
                        ("mlp.down_proj", (64, 128))):
        t[f"{p}{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    return path, t


@pytest.mark.parametrize("shard", ["../outside.safetensors", "../../outside.safetensors", "ABSOLUTE",
                                   "sub/../../outside.safetensors", "..", "", 7])
def test_index_shard_names_stay_in_the_folder(capsys, tmp_path: Path, shard) -> None:
    """A weight_map that names a shard outside the model folder is refused, even when that file exists
    and is a valid shard (so following the name would have worked)."""
    model, tensors = _tiny_model(tmp_path / "a" / "b" / "model")
    outside = tmp_path / "a" / "outside.safetensors"
    save_file(tensors, str(outside))
    save_file(tensors, str(tmp_path / "outside.safetensors"))
    name = str(outside) if shard == "ABSOLUTE" else shard
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: name for n in tensors}}))
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out))
    one_line_error(code, err, "model.safetensors.index.json", "shard name", "re-download")
    assert not out.exists()


def test_index_with_plain_shard_names_still_reads(tmp_path: Path) -> None:
    """The control: the same folder with an in-folder shard name opens and reads."""
    from lowbit.model.hf import ModelFolder

    model, tensors = _tiny_model(tmp_path / "model")
    save_file(tensors, str(model / "model-00001-of-00001.safetensors"))
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in tensors}}))
    folder = ModelFolder(model)
    assert torch.equal(folder.get("model.norm.weight"), tensors["model.norm.weight"])


# ---------------------------------------------------------------- read-only inputs


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: its kind, mode, size, mtime and (files) sha256."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        snap[p.relative_to(folder).as_posix()] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                                                  st.st_mtime_ns, digest)
    st = folder.stat()
    snap["."] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return snap


def test_read_only_model_folder_is_never_touched(capsys, tmp_path: Path, tiny_model: Path, texts) -> None:
    """chmod -R a-w on a copy of the model, then quantize (checkpoint, GGUF, GPTQ) and eval from it.

    As root chmod does not stop writes, so the test proves the same claim by its checksums: the listing,
    the bytes, the modes and the mtimes of everything in the folder are unchanged."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    calib, text = texts
    subprocess.run(["chmod", "-R", "a-w", str(model)], check=True)
    try:
        try:
            (model / "probe").write_text("x")
            enforced = False  # root: chmod is advisory, the checksums below carry the test
            (model / "probe").unlink()
        except PermissionError:
            enforced = True
        before = _snapshot(model)
        outs = tmp_path / "outs"
        for args in (["quantize", str(model), "-o", str(outs / "ck")],
                     ["quantize", str(model), "--format", "gguf", "--type", "Q8_0", "-o", str(outs / "m.gguf")],
                     ["quantize", str(model), "--method", "gptq", "--calib-text", str(calib), "--calib-samples", "4",
                      "--calib-seqlen", "64", "-o", str(outs / "gptq")],
                     ["eval", str(outs / "ck"), "--ref", str(model), "--eval-text", str(text), "--ctx", "64",
                      "--windows", "2", "--json"]):
            code, _, err = run(capsys, *args)
            assert code == 0, (args, err)
        assert _snapshot(model) == before, f"model folder changed (chmod enforced: {enforced})"
        assert (outs / "ck" / "lowbit.json").is_file() and (outs / "m.gguf").is_file()
        assert (outs / "gptq" / "lowbit.json").is_file()
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(model)], check=True)


# ---------------------------------------------------------------- one writer per output

HOLDER = """
import sys, time
from pathlib import Path
from lowbit.quant.pipeline import PartialRun
states = [PartialRun(Path(out), "held-by-another-process") for out in sys.argv[1:-1]]
print("held", flush=True)
if sys.argv[-1] == "sleep":
    time.sleep(600)
"""


def _hold(outs: list[Path], mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, outs), mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_until_the_holder_dies(capsys, tmp_path: Path, tiny_model: Path) -> None:
    from lowbit.formats.atomic import atomic_dir, atomic_file, lock_path
    from lowbit.quant.pipeline import PartialRun

    out, gguf = tmp_path / "q", tmp_path / "m.gguf"
    holder = _hold([out, gguf], "sleep")  # real `.q.partial` and `.m.gguf.partial` writers in another process
    try:
        assert (tmp_path / ".q.partial").is_dir() and lock_path(out).is_file()
        code, _, err = run(capsys, "quantize", str(tiny_model), "-o", str(out))
        line = one_line_error(code, err, str(out), f"another lowbit process {holder.pid} is writing it",
                              str(lock_path(out)))
        assert "choose another output path" in line
        for writer in (lambda: PartialRun(out, "k"), lambda: atomic_dir(out).__enter__(),
                       lambda: atomic_file(out).__enter__()):
            with pytest.raises(LowbitError, match="another lowbit process"):
                writer()
        code, _, err = run(capsys, "quantize", str(tiny_model), "--format", "gguf", "--type", "Q8_0",
                           "-o", str(gguf))
        one_line_error(code, err, str(gguf), "another lowbit process")
        assert not out.exists() and not gguf.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    # the kernel dropped the dead holder's flock: the next run takes the stale lock file and proceeds
    assert lock_path(out).is_file()
    code, _, err = run(capsys, "quantize", str(tiny_model), "-o", str(out))
    assert code == 0, err
    assert (out / "lowbit.json").is_file()
    assert not lock_path(out).exists() and not (tmp_path / ".q.partial").exists()


def test_lock_is_released_on_exit_and_reentrant_in_process(tmp_path: Path) -> None:
    from lowbit.formats import atomic
    from lowbit.quant.pipeline import PartialRun

    out = tmp_path / "q"
    holder = _hold([out], "exit")  # exits without cleaning up anything
    assert holder.wait(timeout=60) == 0
    state = PartialRun(out, "k")  # the exited holder's lock is gone
    with atomic.atomic_dir(out) as tmp:  # the run's own final write takes the lock it holds again
        (tmp / "f").write_text("x")
    assert atomic.lock_path(out).is_file()
    state.remove()
    assert not atomic.lock_path(out).exists() and atomic._HELD == {}
    # a failed run releases its lock when its state is dropped
    state = PartialRun(out, "k2")
    del state
    assert atomic._HELD == {} and not atomic.lock_path(out).exists()
