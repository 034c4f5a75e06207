"""Every Python block of README.md and docs/*.md runs as written, on a tiny offline CLIP (only the model name is
substituted), unless its first line says what it needs (`# needs: hub`, ...); the pages' facts hold."""

from __future__ import annotations

import re

from doc_pages import NEEDS, REPO, all_text, blocks, page_text, pages
from remote import run_isolated

BIG_CLIP = "openai/clip-vit-large-patch14-336"
WITHOUT_SOFTBIO = "# Without softbio installed"


def test_the_python_blocks_run_in_order(tiny_clip_dir, tmp_path, monkeypatch):
    """Page by page (README, docs/pipeline.md, then the others), each page's blocks in one namespace, in one folder
    holding the repository's examples/: what a reader pasting them in order gets."""
    pipeline_page = page_text("docs/pipeline.md")
    before_first = pipeline_page.split("```python")[0]
    assert "run from the repository root" in before_first and "`pip install -e .`" in before_first  # elsewhere
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the blocks use the repository's example photos
    namespaces: dict[str, dict] = {}
    ran, isolated = [], 0
    for page in pages():
        namespace = namespaces.setdefault(page.name, {"__name__": "docs"})
        for block in blocks(page, ("python",)):
            if block.needs is not None:
                assert block.needs in NEEDS, f"{block.where}: `# needs: {block.needs}` is not one of {NEEDS}"
                continue
            source = block.text.replace(BIG_CLIP, str(tiny_clip_dir))
            if block.text.startswith(WITHOUT_SOFTBIO):  # as its users run it: a fresh process without softbio
                stdout = run_isolated(
                    tmp_path, 'import sys\nsys.modules["softbio_hf"] = None\n' + source + "\nprint(faces)"
                )
                assert "'emotion'" in stdout, block.where
                isolated += 1
                continue
            exec(compile(source, f"{block.where} (python block)", "exec"), namespace)  # a failure names the block
            ran.append(block.where)
    assert isolated == 1 and len(ran) >= 6, ran
    readme, pipeline, video = namespaces["README.md"], namespaces["pipeline.md"], namespaces["video.md"]
    assert readme["faces"] and "age" in readme["faces"][0]  # the landing page's block found the astronaut
    assert pipeline["faces"] and "age" in pipeline["faces"][0]
    assert set(pipeline["out"].logits) == {"age", "gender", "emotion"}
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the methods block shipped a checkpoint
    assert video["result"]["decoding"]["status"] == "complete" and video["result"]["frames"]


def test_the_study_page_is_linked_and_quotes_the_configs_and_the_parameter_counts():
    """docs/STUDY.md says what each run compares with; its quoted settings must be the configs' own."""
    from bench.parameters import report
    from train.config import load_config

    study = (REPO / "docs" / "STUDY.md").read_text()
    assert "(docs/STUDY.md)" in page_text("README.md") and "(STUDY.md)" in page_text("docs/training.md")
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
    """Following the docs leaves runs/, data/, softbio-zs/, preview/, bench-results/ and tiny/ behind: none is a
    change."""
    import subprocess

    for folder in ("runs", "data", "softbio-zs", "preview", "bench-results", "tiny"):
        assert folder in all_text(), folder
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x"], cwd=REPO)
        assert ignored.returncode == 0, f"{folder}/ is not in .gitignore"


def test_the_offline_route_builds_a_tiny_model_the_pipeline_and_the_demo_take(tmp_path, capsys):
    """README's offline route: `python -m softbio_hf.tiny OUT` writes a tiny random softbio model (and its CLIP)
    that loads as the pipeline (here even as remote code, without softbio installed); OUT is never replaced."""
    from photos import grace_hopper_path

    from softbio_hf.tiny import main

    readme = page_text("README.md")
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
    texts = {str(page.relative_to(REPO)): page.read_text() for page in pages()}
    texts |= {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "train" / "configs").glob("*.yaml")}
    for name, text in texts.items():
        for mention in re.finditer(r"Table 4\.2\b", text):
            around = text[mention.start() - 120 : mention.end()]
            assert "footnote" in around, (name, text[mention.start() - 60 : mention.end() + 60])
    study, training = texts["docs/STUDY.md"], texts["docs/training.md"]
    assert "for age exactly" not in study and "16.45 against its 16.37" in study
    assert "16.45 against its 16.37" in training and "exact for age:" not in training
    assert "gender rows, as in the study" not in training and "its own footnote calls synthetic" in training
    assert "emotion 5.47%" in study  # the slides' raw task shares, beside what task_alpha makes of them
