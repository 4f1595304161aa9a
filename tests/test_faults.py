"""Issue 15, faults: a full disk under every writer, kills and signals mid-run, concurrent cache fills.

* Disk full (needs root, for a tmpfs of a chosen size; skipped with the reason otherwise). Each writer
  (lowbit checkpoint, GGUF, compressed-tensors, gptq, awq, bnb, aqlm, mlx and mlx's own grid, fp8,
  imatrix, report; a GPTQ lowbit checkpoint behind -m slow, as aqlm covers calibration) runs on
  a tiny model with its output on a small tmpfs, twice: once sized to hold only half of its resumable
  state (`.OUT.partial`), once with a ballast file filling the disk as the final output starts, so that
  half of it fits. Every failure is exit 2 with one `lowbit: error:` line naming the output and "no space
  left on device", no traceback; nothing is left at OUT, no temporary or lock beside it; the only thing
  kept is a `.partial` folder with finished layers, which the message names. After the disk is grown
  the same command (resuming from those layers) writes the same bytes as an undisturbed run.
* Signals: SIGTERM and SIGINT while `lowbit quantize` is between layers exit 143 / 130, keep the
  finished layer, and print the exact command; running it finishes with the undisturbed run's bytes.
* Kills: SIGKILL after the first layer is saved, and in the middle of the final write; the rerun's
  output is byte-identical. (benchmarks/kills.py does 20 random kills per kind.)
* FP-reference cache: two processes filling the same entry at once compute it once (the second waits
  for the first's lock and loads its entry) and both read identical logits; a filler killed mid-fill
  leaves nothing that stops the next one, and its temporary is cleared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from lowbit.cli import main

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-spm (real SentencePiece tokenizer, 32000 pieces) at width 64 with 2 layers: every writer
    (GGUF and calibrated ones included) runs on it in well under a second."""
    from families import build_family_model

    return build_family_model("llama-spm", tmp_path_factory.mktemp("faults") / "llama-spm",
                              overrides={"hidden_size": 64, "intermediate_size": 128})


@pytest.fixture(scope="module")
def calib_text(eval_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(eval_text.read_text(encoding="utf-8")[:4000], encoding="utf-8")  # ~1000 tokens: 4 x 64 needed
    return path


class Disk:
    """A tmpfs mounted for the test (root only), grown or ballasted on demand, unmounted afterwards."""

    def __init__(self, root: Path):
        self.root = root
        self.mounts: list[Path] = []

    def mount(self, size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a disk-full test mounts a small tmpfs, which needs root")
        path = self.root / f"disk{len(self.mounts)}"
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_pages(size)}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs ({res.stderr.strip()})")
        self.mounts.append(path)
        return path

    def grow(self, path: Path, size: int = 256 << 20) -> None:
        subprocess.run(["mount", "-o", f"remount,size={_pages(size)}", str(path)], check=True)

    def unmount_all(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.mounts.clear()


def _pages(size: int) -> int:
    return max(PAGE, -(-int(size) // PAGE) * PAGE)


@pytest.fixture
def disk(tmp_path: Path):
    d = Disk(tmp_path)
    yield d
    d.unmount_all()


def _used(path: Path) -> int:
    """Bytes `path` takes on a tmpfs: every file rounded up to whole pages."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(_pages(p.stat().st_size) for p in files)


def _tree(path: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file under `path` (our ballast aside)."""
    return {p.relative_to(path).as_posix(): _digest(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "ballast"}


def _digest(path: Path) -> str:
    """sha256 of the bytes; for a safetensors file the header is taken as JSON, since safetensors writes a
    metadata dict of two or more keys (the imatrix twin's) in a different order in every process."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        data = json.dumps(json.loads(data[8:8 + n]), sort_keys=True).encode() + data[8 + n:]
    return hashlib.sha256(data).hexdigest()


def _error_line(code: int, err: str) -> str:
    """The run failed with exit 2 and exactly one `lowbit: error:` line (the last), no traceback.
    Lines before it are the run's own progress notes (calibration, resuming)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("lowbit: error:")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], (code, err)
    assert "Traceback" not in err
    return errors[0]


# ---------------------------------------------------------------- disk full


@dataclass
class Writer:
    name: str
    args: Callable[[Path, Path, Path], list[str]]  # (model, calib text, OUT) -> lowbit arguments
    out_name: str = "q"
    resumable: bool = True  # keeps finished layers in a `.partial` folder
    setup: Callable[[Path], None] | None = None  # prepares OUT's folder (the report's RUN)
    slow: bool = False  # behind -m slow: another path (calibration, acts in the state) covers it by default


def _quantize(*extra: str) -> Callable[[Path, Path, Path], list[str]]:
    return lambda model, calib, out: ["quantize", str(model), *extra, "-o", str(out)]


CALIB = ("--calib-samples", "4", "--calib-seqlen", "64")


def _report_setup(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text((REPO / "tests" / "data" / "run_results_sample.json").read_text())


WRITERS = [
    Writer("lowbit", _quantize("--group-size", "32")),
    Writer("gptq-lowbit", lambda m, c, o: _quantize("--method", "gptq", "--group-size", "32", "--calib-text", str(c),
                                                    *CALIB)(m, c, o), slow=True),
    Writer("gguf", _quantize("--format", "gguf", "--type", "Q8_0"), out_name="q.gguf"),
    Writer("compressed-tensors", _quantize("--format", "compressed-tensors", "--group-size", "32", "--no-measure")),
    Writer("gptq", _quantize("--format", "gptq", "--group-size", "32", "--no-measure")),
    Writer("awq", _quantize("--format", "awq", "--group-size", "32", "--no-measure")),
    Writer("bnb", _quantize("--format", "bnb", "--bits", "4")),
    Writer("aqlm", lambda m, c, o: _quantize("--format", "aqlm", "--beam", "1", "--rounds", "1", "--calib-text", str(c),
                                             *CALIB)(m, c, o)),
    Writer("mlx", _quantize("--format", "mlx", "--group-size", "32", "--no-measure")),
    Writer("mlx-reference", _quantize("--format", "mlx", "--method", "mlx", "--group-size", "32"), resumable=False),
    Writer("fp8", _quantize("--format", "compressed-tensors", "--method", "fp8")),
    Writer("imatrix", lambda m, c, o: ["imatrix", str(m), "--calib-text", str(c), *CALIB, "-o", str(o)],
           out_name="im.gguf", resumable=False),
    Writer("report", lambda m, c, o: ["report", str(o.parent)], out_name="report.html", resumable=False,
           setup=_report_setup),
]


def _run(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    _, err = capsys.readouterr()
    return code, err


class _Measure:
    """What an undisturbed run leaves on disk: the resumable state's peak size (taken as it is removed)."""

    def __init__(self, monkeypatch):
        from lowbit.quant.pipeline import PartialRun

        self.partial = 0
        remove = PartialRun.remove

        def measured(state):
            self.partial = max(self.partial, _used(state.dir))
            remove(state)

        monkeypatch.setattr(PartialRun, "remove", measured)


def _ballast_before(monkeypatch, out: Path, leave: int) -> None:
    """When the writer starts OUT's final temporary, fill its disk so only `leave` bytes stay free
    (another program filling the disk while lowbit writes)."""
    from lowbit.formats import atomic

    def filling(original):
        def wrapped(target: Path):
            if Path(target).name == out.name:
                st = os.statvfs(out.parent)
                free = st.f_bavail * st.f_frsize
                with open(out.parent / "ballast", "wb") as fh:
                    fh.truncate(0)
                    if free > leave:
                        os.posix_fallocate(fh.fileno(), 0, _pages(free - leave))
            yield from original(target)
        return wrapped

    monkeypatch.setattr(atomic, "_atomic_dir", filling(atomic._atomic_dir))
    monkeypatch.setattr(atomic, "_atomic_file", filling(atomic._atomic_file))


def _leftovers(folder: Path) -> list[str]:
    """Everything beside OUT other than our ballast and the setup's inputs."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("ballast", "results.json"))


@pytest.mark.parametrize("writer", [pytest.param(w, id=w.name, marks=[pytest.mark.slow] if w.slow else [])
                                    for w in WRITERS])
def test_disk_full_is_one_line_leaves_nothing_and_resumes(writer: Writer, capsys, monkeypatch, tmp_path: Path,
                                                          disk: Disk, tok_model: Path, calib_text: Path) -> None:
    # the undisturbed run, on an ordinary disk
    measure = _Measure(monkeypatch)
    ref_out = tmp_path / "ref" / writer.out_name
    if writer.setup:
        writer.setup(ref_out.parent)
    code, err = _run(capsys, writer.args(tok_model, calib_text, ref_out))
    assert code == 0, err
    want = _tree(ref_out.parent)
    need, state = _used(ref_out), measure.partial
    assert need > 0 and (state > 0) == writer.resumable, (need, state)
    monkeypatch.undo()

    cases = [("final write", state + 2 * need, need // 2)]  # room for the state, then the disk fills at OUT
    if writer.resumable:
        cases.insert(0, ("resumable state", state // 2, None))  # fills while saving finished layers
    for phase, size, ballast in cases:
        root = disk.mount(size + (64 << 10 if ballast is not None else 0))
        out = root / writer.out_name
        if writer.setup:
            writer.setup(root)
        if ballast is not None:
            _ballast_before(monkeypatch, out, ballast)
        code, err = _run(capsys, writer.args(tok_model, calib_text, out))
        monkeypatch.undo()
        line = _error_line(code, err)
        assert "no space left on device" in line, (phase, line)
        if phase == "resumable state":
            assert "saving its resumable state" in line, line
        assert not out.exists(), (phase, line)
        left = _leftovers(root)
        assert all(name.endswith(".partial") for name in left), (phase, left, line)
        for name in left:  # a kept state is named in the error and holds at least one finished layer
            assert f"{root / name} (" in line and "the same command resumes there" in line, (name, line)
            assert json.loads((root / name / "state.json").read_text())["done"] >= 1
        # more space, the same command: it resumes (if anything was kept) and writes the same bytes
        (root / "ballast").unlink(missing_ok=True)
        disk.grow(root)
        code, err = _run(capsys, writer.args(tok_model, calib_text, out))
        assert code == 0, (phase, err)
        assert ("resuming" in err) == bool(left), (phase, err)
        assert _tree(root) == want, phase  # OUT and what goes beside it (a GGUF's Modelfile, the report's PNGs)


def test_a_disk_full_from_the_start_is_one_line(capsys, disk: Disk, tok_model: Path) -> None:
    """One free page: even the lock file and the first temporary cannot be written."""
    root = disk.mount(PAGE)
    (root / "filler").write_bytes(b"x" * PAGE)
    for args in (["quantize", str(tok_model), "--group-size", "32", "-o", str(root / "q")],
                 ["quantize", str(tok_model), "--format", "gguf", "--type", "Q8_0", "-o", str(root / "q.gguf")]):
        code, err = _run(capsys, args)
        line = _error_line(code, err)
        assert "no space left on device" in line
        assert sorted(p.name for p in root.iterdir()) == ["filler"], line


# ---------------------------------------------------------------- signals and kills

# `lowbit quantize` that stops after saving layer 0, or as the final checkpoint is being written (its
# temporary folder exists, its metadata does not), and says so on stdout, so the test signals it at a
# known point instead of racing it
PAUSING = """
import sys, time
import lowbit.formats.lowbit_ckpt as ckpt
import lowbit.quant.pipeline as pipeline
where, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("paused", flush=True)
    time.sleep(120)

save = pipeline.PartialRun.save_tensors
def save_then_pause(self, i, *a, **k):
    save(self, i, *a, **k)
    if where == "layer0" and i == 0:
        pause()
pipeline.PartialRun.save_tensors = save_then_pause

close = ckpt.LowbitWriter.close
def pause_then_close(self, meta):
    if where == "final":
        pause()
    close(self, meta)
ckpt.LowbitWriter.close = pause_then_close

from lowbit.cli import main
sys.exit(main(argv))
"""


def _pausing(where: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LOWBIT_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSING, where, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "paused":
        proc.kill()
        raise AssertionError(f"never paused: {line!r} {proc.stderr.read()}")
    return proc


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A 4-layer tiny model and the tree of its undisturbed rtn checkpoint."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("four")
    model = root / "model"
    model.mkdir()
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "tie_word_embeddings": True}
    (model / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(32, 64, generator=g), "model.norm.weight": torch.ones(64)}
    for i in range(4):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(64)
        t[p + "post_attention_layernorm.weight"] = torch.ones(64)
        for name, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128))):
            t[f"{p}{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    save_file(t, str(model / "model.safetensors"))
    assert main(["quantize", str(model), "--group-size", "32", "-o", str(root / "ref")]) == 0
    return model, _tree(root / "ref")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_128_plus_n_keeps_the_state_and_prints_the_resume_command(sig, capsys, tmp_path: Path,
                                                                               four_layers) -> None:
    model, want = four_layers
    out = tmp_path / "q"
    args = ["quantize", str(model), "--group-size", "32", "-o", str(out)]
    proc = _pausing("layer0", args)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    partial = tmp_path / ".q.partial"
    assert lines[-2].startswith(f"lowbit: interrupted ({sig.name})"), err
    assert f"kept in {partial} (1 layer done)" in lines[-2], err
    assert lines[-1] == f"lowbit: to resume, run: {shlex.join(['lowbit', *args])}", err
    assert "Traceback" not in err
    assert not out.exists() and json.loads((partial / "state.json").read_text())["done"] == 1
    resume = shlex.split(lines[-1].removeprefix("lowbit: to resume, run: "))
    code, err = _run(capsys, resume[1:])
    assert code == 0 and "resuming" in err, err
    assert _tree(out) == want and not partial.exists()


@pytest.mark.parametrize("where", ["layer0", "final"])
def test_sigkill_then_rerun_is_byte_identical(where: str, capsys, tmp_path: Path, four_layers) -> None:
    """SIGKILL after layer 0 is saved, or with the final checkpoint's shards written but not its metadata."""
    model, want = four_layers
    out = tmp_path / "q"
    args = ["quantize", str(model), "--group-size", "32", "-o", str(out)]
    proc = _pausing(where, args)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists()
    if where == "final":  # the unfinished final folder is there under its temporary name
        assert any(p.name.startswith(".q.tmp-") for p in tmp_path.iterdir())
    code, err = _run(capsys, args)
    assert code == 0 and "resuming" in err, err
    assert _tree(out) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the dead run's temporary is cleared


# ---------------------------------------------------------------- the FP-reference cache

# fill the FP-reference cache for fixed token windows of the tiny model after a barrier, the fill slowed
# so the two processes surely overlap; print whether this process computed, and a digest of what it read
FILLER = """
import hashlib, os, sys, time
from pathlib import Path
import torch
import lowbit.eval.reference as reference
from lowbit.eval.data import EvalWindows
from lowbit.model.forward import FolderWeights
from lowbit.model.hf import ModelFolder
model, barrier, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
allocate = reference._preallocated_memmap
def slow(*a, **k):  # inside the fill: the entry's temporary folder and its logits file exist
    logp = allocate(*a, **k)
    print("computing", flush=True)
    time.sleep(1.5)
    return logp
reference._preallocated_memmap = slow
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < n:
    time.sleep(0.01)
tokens = torch.randint(0, 32, (2, 64), generator=torch.Generator().manual_seed(0))
ref = reference.get_reference(FolderWeights(ModelFolder(model)), model, EvalWindows(tokens, (0, 0), "random", 64, 64))
h = hashlib.sha256()
for a in (ref.logp, ref.nll, ref.argmax):
    h.update(bytes(memoryview(a.copy())))
print("digest", h.hexdigest(), flush=True)
"""


def _fillers(n: int, model: Path, cache: Path, barrier: Path) -> list[subprocess.Popen]:
    barrier.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LOWBIT_CACHE": str(cache)}
    return [subprocess.Popen([sys.executable, "-c", FILLER, str(model), str(barrier), str(n)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]


def test_two_processes_fill_the_fp_reference_cache_once(tmp_path: Path, four_layers) -> None:
    cache = tmp_path / "cache"
    procs = _fillers(2, four_layers[0], cache, tmp_path / "barrier")
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    computed = sum(out.count("computing") for out, _ in outs)
    digests = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("digest")}
    assert computed == 1, outs  # the second process waited for the first one's entry
    assert len(digests) == 1, outs
    entries = sorted(p.name for p in (cache / "ref").iterdir())
    assert len(entries) == 1 and not entries[0].startswith("."), entries  # no temporary, no lock left
    assert (cache / "ref" / entries[0] / "meta.json").is_file()


def test_a_killed_filler_leaves_the_cache_usable(tmp_path: Path, four_layers) -> None:
    cache = tmp_path / "cache"
    (victim,) = _fillers(1, four_layers[0], cache, tmp_path / "b1")
    assert victim.stdout.readline().strip() == "computing"  # it holds the entry's lock, its temporary exists
    assert [p for p in (cache / "ref").iterdir() if ".tmp-" in p.name]
    victim.kill()
    victim.communicate(timeout=30)
    (heir,) = _fillers(1, four_layers[0], cache, tmp_path / "b2")
    out, err = heir.communicate(timeout=120)
    assert heir.returncode == 0 and "computing" in out and "digest" in out, err
    entries = sorted(p.name for p in (cache / "ref").iterdir())
    assert len(entries) == 1 and not entries[0].startswith("."), entries
