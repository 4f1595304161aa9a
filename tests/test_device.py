"""The device path (layers moved to a device, activations maybe offloaded) against the pre-device code.

`tests/data/device_golden.json` holds digests of every tensor written by the code as it was before
`--device` existed (commit named in the file), for RTN, GPTQ and AWQ checkpoints and RTN / GPTQ GGUFs
of the real model cut to two layers. The device path with device="cpu" must reproduce them byte for
byte. Float results depend on the CPU (torch picks other kernels on other microarchitectures: an AMD EPYC
and the recording machine, both AVX512, differ in GPTQ/AWQ and imatrix bytes), so the file holds one entry
per recorded host: torch version, torch's CPU capability and the CPU model name. An entry named "*" serves
any host not listed by name; with no entry of this torch and capability the test skips, saying so.

Run `python tests/test_device.py --record` to re-record (only when a change of output is intended and
documented in the README with its measured KLD). A host that cannot re-record at once keeps its other digests
and names the missing one, with the reason, under "not_recorded".
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "device_golden.json"
CHECKPOINTS = ("rtn:4:128", "gptq:4:128", "awq:4:128")
GGUFS = ("rtn", "gptq")


def tensor_digest(tensors: dict[str, "torch.Tensor"]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_digest(folder: Path) -> str:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensor_digest(tensors)


def gguf_digest(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return tensor_digest({t.name: torch.from_numpy(t.data.copy()).reshape(-1).view(torch.uint8)
                          for t in reader.tensors})


def produce(model_dir: Path, out: Path, **device_kwargs) -> dict[str, str]:
    """Digests of every golden output, quantized with `device_kwargs` (none: the caller's default path)."""
    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.imatrix import compute_imatrix
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(8, 128, seed=0))
    digests = {}
    for cfg in CHECKPOINTS:
        path = out / cfg.replace(":", "_")
        quantize_checkpoint(model_dir, parse_config(cfg), path, calib=calib, **device_kwargs)
        digests[cfg] = checkpoint_digest(path)
    imatrix = compute_imatrix(model_dir, calib, **device_kwargs)
    for method in GGUFS:
        path = out / f"{method}.gguf"
        quantize_to_gguf(model_dir, GGUFConfig("Q4_K_M", method), path, calib=calib, imatrix=imatrix,
                         **device_kwargs)
        digests[f"gguf:Q4_K_M:{method}"] = gguf_digest(path)
    return digests


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("AMD EPYC", ...), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def golden_for_host(golden: dict) -> dict | None:
    """The recorded entry for this host: same torch and capability, this CPU model or else the "*" entry."""
    same = [h for h in golden["hosts"] if h["torch"] == torch.__version__ and h["cpu_capability"] == cpu_capability()]
    named = [h for h in same if h["cpu_model"] == cpu_model()]
    return (named or [h for h in same if h["cpu_model"] == "*"] or [None])[0]


def test_cpu_device_path_matches_pre_device_outputs(small_model_dir: Path, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    entry = golden_for_host(golden)
    if entry is None:
        recorded = ", ".join(f"torch {h['torch']} on {h['cpu_capability']} ({h['cpu_model']})" for h in golden["hosts"])
        pytest.skip(f"golden digests were recorded with {recorded}; this is torch {torch.__version__} on "
                    f"{cpu_capability()} ({cpu_model()})")
    got = produce(small_model_dir, tmp_path, device="cpu")
    # A host can lack a digest whose output changed on purpose after it was recorded (that host must re-record
    # it); the entry names each such key and why, so nothing goes unchecked silently.
    missing = entry.get("not_recorded", {})
    assert set(got) == set(entry["digests"]) | set(missing)
    assert {k: v for k, v in got.items() if k not in missing} == entry["digests"]


def _record() -> None:
    import subprocess
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import small_model_dir as fixture  # noqa: F401  (the same cut as the tests use)

    from lowbit.model.default import default_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "cut"
        cut.mkdir()
        fixture.__wrapped__(default_model_dir(), type("F", (), {"mktemp": lambda self, n: cut})())
        digests = produce(cut, Path(tmp))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"hosts": []}
    entry = {"cpu_model": cpu_model(), "torch": torch.__version__, "cpu_capability": cpu_capability(),
             "commit": commit, "digests": digests}
    golden["hosts"] = [entry] + [h for h in golden["hosts"] if (h["cpu_model"], h["torch"], h["cpu_capability"]) !=
                                 (entry["cpu_model"], entry["torch"], entry["cpu_capability"])]
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
    print(GOLDEN.read_text())


if __name__ == "__main__" and "--record" in sys.argv:
    _record()


def test_device_names_resolve_or_fail_in_one_line() -> None:
    from lowbit.errors import LowbitError
    from lowbit.runtime import placement, resolve_device

    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match=r"--device cuda:1: torch .* sees 0 CUDA GPU\(s\); use --device cpu"):
            resolve_device("cuda:1")
    with pytest.raises(LowbitError, match="--device 'tpu': unknown device; choose auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    with pytest.raises(LowbitError, match="cuda or cuda:N"):
        resolve_device("cuda:x")
    where = placement("cpu", offload_activations=True)
    x = torch.ones(2, 3)
    assert where.activations(x) is x and where.compute(x) is x  # on the CPU every move is a no-op


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_refuses_a_missing_gpu_before_any_work(tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    assert main(["quantize", "--device", "cuda", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: --device cuda: torch (") and "sees 0 CUDA GPU(s); use --device cpu" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
