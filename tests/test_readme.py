"""Every Python block of README.md runs as written, on a tiny offline CLIP (only the model name is substituted)."""

from __future__ import annotations

import re
from pathlib import Path

from remote import run_isolated

REPO = Path(__file__).resolve().parents[1]
BIG_CLIP = "openai/clip-vit-large-patch14-336"
WITHOUT_SOFTBIO = "# Without softbio installed"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_python_blocks_run_in_order(tiny_clip_dir, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 5
    before_first = (REPO / "README.md").read_text().split("```python")[0]
    assert "run from the repository root" in before_first and "`pip install -e .`" in before_first  # elsewhere
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the blocks use the repository's example photos
    namespace: dict = {"__name__": "readme"}
    isolated = 0
    for number, block in enumerate(blocks, start=1):
        source = block.replace(BIG_CLIP, str(tiny_clip_dir))
        if block.startswith(WITHOUT_SOFTBIO):  # as its users run it: a fresh process where softbio cannot import
            stdout = run_isolated(
                tmp_path, 'import sys\nsys.modules["softbio_hf"] = None\n' + source + "\nprint(faces)"
            )
            assert "'emotion'" in stdout
            isolated += 1
            continue
        exec(compile(source, f"README.md python block {number}", "exec"), namespace)  # a failure names the block
    assert isolated == 1
    assert namespace["faces"] and "age" in namespace["faces"][0]  # the pipeline block found the astronaut
    assert set(namespace["out"].logits) == {"age", "gender", "emotion"}
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the methods block shipped a checkpoint


def test_the_study_page_is_linked_and_quotes_the_configs_and_the_parameter_counts():
    """docs/STUDY.md says what each run compares with; its quoted settings must be the configs' own."""
    from bench.parameters import report
    from train.config import load_config

    study = (REPO / "docs" / "STUDY.md").read_text()
    assert "(docs/STUDY.md)" in (REPO / "README.md").read_text()
    lora, mtlora = load_config("lora"), load_config("mtlora")
    assert lora["model"]["head_hidden_size"] == 512 and "**512** units" in study
    assert lora["data"]["class_balance"] == "mix" and lora["data"]["class_mix"] == 0.5
    assert (
        f"shared rank {mtlora['method']['rank']} everywhere; task-specific rank {mtlora['method']['task_rank']}"
        in study
    )
    trainable = {row["method"].split()[0]: row["trainable"] for row in report()}
    for method in ("LP", "FT4", "LoRA", "DoRA", "MTLoRA"):
        assert f"{method} {trainable[method] / 1e6:.1f}M" in study, method


def test_the_readmes_default_outputs_are_ignored_by_git():
    """Following the README leaves runs/, data/, softbio-zs/, preview/, bench-results/ and tiny/ behind: none is a
    change."""
    import subprocess

    for folder in ("runs", "data", "softbio-zs", "preview", "bench-results", "tiny"):
        assert folder in (REPO / "README.md").read_text(), folder
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x"], cwd=REPO)
        assert ignored.returncode == 0, f"{folder}/ is not in .gitignore"


def test_the_offline_route_builds_a_tiny_model_the_pipeline_and_the_demo_take(tmp_path, capsys):
    """README's offline route: `python -m softbio_hf.tiny OUT` writes a tiny random softbio model (and its CLIP)
    that loads as the pipeline (here even as remote code, without softbio installed); OUT is never replaced."""
    from photos import grace_hopper_path

    from softbio_hf.tiny import main

    readme = (REPO / "README.md").read_text()
    assert "python -m softbio_hf.tiny tiny" in readme and "python app.py --model tiny/softbio" in readme
    assert main([str(tmp_path / "tiny")]) == 0
    assert "python app.py --model" in capsys.readouterr().out
    assert (tmp_path / "tiny" / "clip" / "tokenizer_config.json").is_file()
    script = (
        'import sys\nsys.modules["softbio_hf"] = None\nfrom transformers import pipeline\n'
        "faces = pipeline(model=sys.argv[1], trust_remote_code=True)(sys.argv[2], detector='haar')\nprint(faces)"
    )
    assert "'emotion'" in run_isolated(tmp_path, script, str(tmp_path / "tiny" / "softbio"), grace_hopper_path())
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "tiny").rglob("*"))
    assert main([str(tmp_path / "tiny")]) == 2  # an existing folder is not ours to replace
    assert "is not an empty folder (nothing there is replaced)" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "tiny").rglob("*")) == before


def test_the_study_page_names_the_slides_tables_as_they_do():
    """Read against the slides: Table 4.2 is the mean zero-shot accuracy (with the footnote on VGGFace2's synthetic
    ages); the training-mix table ("Weighted %") has no number; the 0.5 mix is exact for age 0-2 only."""
    texts = {"README.md": (REPO / "README.md").read_text(), "docs/STUDY.md": (REPO / "docs" / "STUDY.md").read_text()}
    texts |= {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "train" / "configs").glob("*.yaml")}
    for name, text in texts.items():
        for mention in re.finditer(r"Table 4\.2\b", text):
            around = text[mention.start() - 120 : mention.end()]
            assert "footnote" in around, (name, text[mention.start() - 60 : mention.end() + 60])
    study, readme = texts["docs/STUDY.md"], texts["README.md"]
    assert "for age exactly" not in study and "16.45 against its 16.37" in study
    assert "16.45 against its 16.37" in readme and "exact for age:" not in readme
    assert "gender rows, as in the study" not in readme and "its own footnote calls synthetic" in readme
    assert "emotion 5.47%" in study  # the slides' raw task shares, beside what task_alpha makes of them
