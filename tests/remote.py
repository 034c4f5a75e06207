"""Fresh processes: a checkpoint run where softbio_hf (nor peft) cannot be imported, and commands run without
root's right to write anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["softbio_hf"] = None  # our package cannot be imported ...
    sys.modules["peft"] = None  # ... nor peft: shipped checkpoints must not need it
    import torch
    from transformers import AutoImageProcessor, AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(sys.argv[1])
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(x).logits
    torch.save({k: v for k, v in logits.items()}, sys.argv[3])
    print(type(processor).__name__, processor.crop_size["height"])
    """
)


def run_isolated(tmp_path, script_text: str, *args: str, pythonpath: str | None = None) -> str:
    """Run a script in a fresh Python in tmp_path, offline, with its own HF cache (and `pythonpath`, e.g. the
    repository, to import softbio_hf as an installed package would); returns its stdout."""
    script = tmp_path / "isolated.py"
    script.write_text(script_text)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_without_softbio(tmp_path, model_dir, x) -> dict[str, torch.Tensor]:
    torch.save(x, tmp_path / "x.pt")
    stdout = run_isolated(tmp_path, REMOTE_SCRIPT, str(model_dir), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"))
    assert "32" in stdout
    return torch.load(tmp_path / "out.pt")


def unprivileged() -> list[str]:
    """A command prefix under which file permissions hold even when the tests run as root: setpriv drops the
    capabilities that let root read and write whatever it likes."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
