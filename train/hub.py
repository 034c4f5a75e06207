"""Publish to the Hugging Face Hub: a trained checkpoint with an honest model card, and the demo as a Space.

    python -m train.hub push --model runs/lora/best --repo-id you/softbio-lora --results runs/lora/eval/results.json
    python -m train.hub push --model runs/lora/best --repo-id you/softbio-lora --dry-run --out preview/
    python -m train.hub space --repo-id you/softbio-demo --model you/softbio-lora

Everything goes up in one commit through huggingface_hub's API (create_repo, create_commit); `--dry-run`
writes exactly that folder locally instead. Log in first with `hf auth login`, or set HF_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from softbio_hf.safe_files import folder_written_whole, unwritable_reason

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "softbio_hf"
DEMO_PACKAGE = REPO_ROOT / "softbio_demo"  # app.py's own parts: a Space carries it beside app.py
LICENSE = "mit"
# Where the benchmarks live, for the model-index (a Hub dataset id where one exists).
DATASET_IDS = {"utkface": "UTKFace", "fairface": "HuggingFaceM4/FairFace", "rafdb": "RAF-DB", "vggface2": "VGGFace2"}
# The benchmarks' terms, each from its publisher's page (read them before use: they bind you, not this table).
DATA_TERMS = (
    (
        "UTKFace",
        "non-commercial research only; image copyrights stay with their owners",
        "https://susanqq.github.io/UTKFace/",
    ),
    ("FairFace", "CC BY 4.0", "https://huggingface.co/datasets/HuggingFaceM4/FairFace"),
    ("RAF-DB", "non-commercial research only, released on a signed agreement", "http://www.whdeng.cn/raf/model1.html"),
    (
        "VGGFace2",
        "see terms at the URL (the official download is withdrawn)",
        "https://www.robots.ox.ac.uk/~vgg/data/vgg_face2/",
    ),
    ("CLIP ViT-L/14@336 (base model)", "MIT", "https://github.com/openai/CLIP/blob/main/LICENSE"),
)
MOST_RESTRICTIVE = "RAF-DB"
TASK_NAMES = {"age": "age group", "gender": "gender", "emotion": "facial expression"}
# What the Space needs of requirements.txt: inference only.
TRAINING_ONLY = ("peft", "accelerate", "datasets", "matplotlib", "tensorboard")
LOGIN_HINT = "Log in with `hf auth login`, or set HF_TOKEN (a token with write access), or pass --token."


class HubError(RuntimeError):
    """Something the user can fix (not a checkpoint, not merged, no token, Hub unreachable): exit code 2."""


# ----------------------------------------------------------------------------------------- checkpoint
def checkpoint_config(folder: Path) -> dict[str, Any]:
    """config.json of a softbio checkpoint, read as JSON (no code runs); refuses anything else."""
    path = folder / "config.json"
    if not path.is_file():
        raise HubError(f"--model {folder}: no config.json there; pass a folder written by save_pretrained.")
    from softbio_hf.checkpoint_files import CheckpointFileError, read_config_json

    try:
        config = read_config_json(path)
    except CheckpointFileError as error:
        raise HubError(f"--model {error}") from None
    if config.get("model_type") != "softbio":
        raise HubError(
            f"--model {folder} is a {config.get('model_type')!r} checkpoint, not a softbio one. Build a softbio model "
            "first (SoftBioModel.from_clip or python -m train.train)."
        )
    if not (folder / "model.safetensors").is_file() and not list(folder.glob("model-*.safetensors")):
        raise HubError(f"--model {folder} has no safetensors weights; softbio ships safetensors only.")
    return config


def is_unmerged(config: Mapping[str, Any]) -> bool:
    adapter = config.get("adapter") or {}
    return adapter.get("method") in ("lora", "dora", "loraplus", "mtlora") and not adapter.get("merged")


def load_results(path: Path | None, tasks: Mapping[str, list[str]]) -> dict[str, Any] | None:
    """A results.json of train.evaluate, refused when its tasks or labels are not the model's."""
    if path is None:
        return None
    from train.errors import EvaluationError
    from train.report import read_results

    try:
        results = read_results(path)
    except EvaluationError as error:
        raise HubError(f"--results {error}") from None
    per_dataset = results["results"]
    evaluated = {task for metrics in per_dataset.values() for task in metrics}
    foreign = sorted(evaluated - set(tasks))
    if foreign:
        raise HubError(f"--results {path} scores task(s) {foreign} that the model does not have ({list(tasks)}).")
    if "tasks" in results and set(results["tasks"]) != set(tasks):
        raise HubError(
            f"--results {path} is of a model with the tasks {sorted(results['tasks'])}, not this model's "
            f"{sorted(tasks)}; evaluate this model with python -m train.evaluate."
        )
    if "tasks" in results:
        differing = [t for t in evaluated if list(results["tasks"].get(t, [])) != list(tasks[t])]
        if differing:
            raise HubError(
                f"--results {path} was computed with other labels for {differing} than the model's; evaluate this "
                "model again with python -m train.evaluate."
            )
    return results


def plot_beside(results_path: Path, name: Any) -> Path:
    """A plot that results.json lists: a file name beside it, never a path. Paths read from a file are not
    trusted: `../../x` or `/etc/x` would read, and with --dry-run write, outside the folders given."""
    folder = results_path.parent
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise HubError(
            f"--results {results_path} lists the plot {name!r}, which is not a file name beside it; plots are "
            "listed by name (as train.evaluate writes them). Fix the file or write it again with train.evaluate."
        )
    source = folder / name
    if source.is_symlink() and not source.resolve().is_relative_to(folder.resolve()):
        raise HubError(f"--results {results_path}: the plot {name!r} links outside {folder}; copy the file there.")
    return source


def training_summary(model_dir: Path) -> dict[str, Any] | None:
    """summary.json that python -m train.train writes beside best/, when the checkpoint came from there."""
    path = model_dir.parent / "summary.json"
    return json.loads(path.read_text()) if model_dir.name == "best" and path.is_file() else None


def stage_model(
    model_dir: Path, out: Path, repo_id: str, results_path: Path | None, merge: bool, export: bool = False
) -> list[str]:
    """Write the folder that is uploaded: weights, config, remote code, image processor, card, evaluation, and
    with `export` the ONNX and OpenVINO artifacts (softbio_hf.export) in onnx/ and openvino/."""
    from softbio_hf import SoftBioModel
    from softbio_hf.checkpoint_files import CheckpointFileError
    from softbio_hf.modeling_softbio import refuse_untrained_heads

    config = checkpoint_config(model_dir)
    if is_unmerged(config) and not merge:
        raise HubError(
            f"--model {model_dir} carries unmerged {config['adapter']['method']} adapters (it would need peft to "
            "load). Merge them first: pass --merge, or call model.merge_adapters() and save_pretrained."
        )
    results = load_results(results_path, config.get("tasks") or {})
    plots = [plot_beside(results_path, name) for name in results.get("plots", [])] if results else []
    try:
        model = SoftBioModel.from_pretrained(model_dir)
    except CheckpointFileError as error:
        raise HubError(f"--model {error}") from None
    try:
        refuse_untrained_heads(model)
    except ValueError as error:
        raise HubError(str(error)) from None
    if merge:
        model.merge_adapters()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors, config with auto_map + custom_pipelines, code, image processor
    if export:
        from softbio_hf.export import ExportError
        from softbio_hf.export import export as export_model

        try:
            export_model(model, out, checkpoint=out)  # beside the weights just saved: their digest
        except (ExportError, ImportError) as error:
            raise HubError(f"--export: {error}") from None
    if results is not None:
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "results.json").write_text(json.dumps(results, indent=2))
        plots = [source for source in plots if source.is_file()]
        for source in plots:
            shutil.copy(source, out / "eval" / source.name)
    shown = [f"eval/{source.name}" for source in plots]
    card = model_card(model.config, repo_id, results, training_summary(model_dir), shown, exported=export)
    card.save(out / "README.md")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- card
def eval_results(results: Mapping[str, Any]):
    """One model-index entry per dataset, task and metric, so the Hub shows them."""
    from huggingface_hub import EvalResult

    entries = []
    for dataset, tasks in results["results"].items():
        for task, metrics in tasks.items():
            for metric, key in (
                ("accuracy", "accuracy"),
                ("balanced_accuracy", "balanced_accuracy"),
                ("f1", "macro_f1"),
            ):
                if key in metrics:
                    entries.append(
                        EvalResult(
                            task_type="image-classification",
                            task_name=f"{TASK_NAMES.get(task, task)} ({task})",
                            dataset_type=DATASET_IDS.get(dataset, dataset),
                            dataset_name=f"{dataset} {task}",
                            dataset_config=task,  # the Hub groups results by task type, dataset, config and split
                            dataset_split=results.get("split"),
                            metric_type=metric,
                            metric_name=f"{key.replace('_', ' ')} (%)",
                            metric_value=round(float(metrics[key]), 2),
                        )
                    )
    return entries


def method_line(config) -> str:
    adapter = config.adapter or {}
    method = adapter.get("method", "zs" if config.zero_shot_source else "unknown")
    names = {
        "zs": "zero-shot (heads are CLIP text embeddings of prompts; no face data trained it)",
        "lp": "linear probe (attention pooling and heads trained, backbone frozen)",
        "ft": f"fine-tuning of the last {adapter.get('last_k', 4)} transformer blocks, pooling and heads",
        "lora": "LoRA",
        "dora": "DoRA",
        "loraplus": "LoRA+",
        "mtlora": "MTLoRA",
    }
    line = names.get(method, method)
    if method in ("lora", "dora", "loraplus", "mtlora"):
        targets = ", ".join(adapter.get("target_modules", []))
        line += f", rank {adapter.get('rank')}, alpha {adapter.get('alpha')} on {targets}"
        if method == "mtlora":
            line += f"; task-specific rank {adapter.get('task_rank')} in blocks {adapter.get('task_blocks')}"
        line += "; adapters merged into the backbone weights (no peft needed to run it)"
    return line


def model_card(
    config,
    repo_id: str,
    results: Mapping[str, Any] | None,
    summary: Mapping[str, Any] | None,
    plots,
    exported: bool = False,
):
    """The card from the config and results.json; a checkpoint without results says it is not evaluated."""
    from huggingface_hub import ModelCard, ModelCardData

    from softbio_hf.hub_access import hub_repo_id
    from train.report import calibration_markdown, conformal_markdown, fairness_table, per_dataset_table, summary_table

    adapter_method = (config.adapter or {}).get("method", "zs")
    data = ModelCardData(
        base_model=hub_repo_id(config.zero_shot_source),  # Hub metadata wants a repo id, never a local path
        library_name="transformers",
        pipeline_tag="image-classification",
        license=LICENSE,
        tags=[
            "softbio",
            "soft-biometrics",
            "age-estimation",
            "gender",
            "facial-expression-recognition",
            "clip",
            adapter_method,
        ],
        datasets=sorted({DATASET_IDS.get(d, d) for d in (results or {}).get("results", {})}) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(results) if results else None,
    )
    labels = "\n".join(f"- **{task}**: {', '.join(names)}" for task, names in config.tasks.items())
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "Perceived age group (and an age in years), gender and facial expression of a face, from **one forward "
        "pass** of a CLIP vision transformer with attention pooling and one head per task. Trained, evaluated "
        "and published with softbio (`python -m train.train`, `train.evaluate`, `train.hub`).",
        "",
        "## Model",
        "",
        f"- Base model: `{config.zero_shot_source or 'a CLIP vision tower'}` "
        f"({config.vision_config.num_hidden_layers} blocks, width {config.vision_config.hidden_size}, "
        f"{config.image_size} px)",
        f"- Method: {method_line(config)}",
        f"- Pooling: {config.pooling}; loss weighting: {config.loss_weighting}",
    ]
    if config.calibration:
        temps = ", ".join(f"{t} {v:.3f}" for t, v in config.calibration["temperatures"].items())
        lines.append(
            f"- Calibrated: temperatures ({temps}) folded into the heads, fitted on {config.calibration['fitted_on']}"
        )
    lines += ["", "Labels, in the order of the head's outputs:", "", labels, ""]
    if summary:
        lines += [
            "## Training",
            "",
            f"- Steps: {summary.get('steps')}, best validation step {summary.get('best_step')}",
        ]
        if summary.get("label_coverage"):
            coverage = ", ".join(f"{t} {n:,}" for t, n in summary["label_coverage"].items())
            lines.append(f"- Labelled training rows per task: {coverage}")
        if summary.get("untrained_heads"):
            lines.append(f"- Heads left untrained (no labels): {summary['untrained_heads']}")
        if summary.get("parameters"):
            total = summary["parameters"][-1]
            lines.append(f"- Trainable parameters: {total['trainable']:,} of {total['total']:,}")
            lines += ["", "| part | trainable | total |", "|---|---:|---:|"]
            lines += [f"| {r['part']} | {r['trainable']:,} | {r['total']:,} |" for r in summary["parameters"]]
        lines.append("")
    lines += ["## Evaluation", ""]
    if results is None:
        lines += [
            "**Not evaluated.** This checkpoint was pushed without evaluation results, so no accuracy is claimed. "
            "Measure it with `python -m train.evaluate --model <this repo> --data <prepared datasets>` before relying "
            "on it.",
            "",
        ]
    else:
        lines += [
            f"On the {results.get('split')} split. Accuracy in percent; age is averaged over the datasets with real "
            "ages, overall is the mean of the task columns (as the study behind softbio reports it).",
            "",
            summary_table([(repo_id.split("/")[-1], results["summary"])]),
            "",
            per_dataset_table(results["results"]),
            "",
            "### Fairness: accuracy per group",
            "",
            fairness_table(results["fairness"]) if results.get("fairness") else "The evaluated data has no groups.",
            "",
            "### Calibration (expected calibration error, 15 bins)",
            "",
            calibration_markdown(results.get("calibration") or {}),
            "",
        ]
        if results.get("conformal"):  # the thresholds ship in config.json: the pipeline returns each task's "set"
            lines += ["### Prediction sets (conformal)", "", conformal_markdown(results["conformal"]), ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += [
        "## Intended uses",
        "",
        "Research and aggregate analysis of *perceived* attributes in photos (e.g. audience statistics, dataset "
        "auditing, human-computer interaction studies), with a person reviewing what matters.",
        "",
        "## Out-of-scope uses",
        "",
        "- Identifying or verifying people; any identity decision.",
        "- Automated age-gating, hiring, credit, insurance, policing or surveillance decisions without human review.",
        "- Inferring anything beyond perceived attributes: self-identified gender, actual age, felt emotion, health, "
        "sexuality, ethnicity or character.",
        "",
        "## Limitations and biases",
        "",
        "- The labels are *perceived* attributes as annotators saw them, not facts about a person.",
        "- Gender is binary (male/female) because the public benchmarks are; it cannot represent everyone.",
        "- The training benchmarks are imbalanced (few children under 3 and adults over 70; few fearful or disgusted "
        "faces) and their demographics differ from any given population: expect more errors on under-represented "
        "groups. The fairness table above shows the gaps that could be measured.",
        "- Accuracy drops on occluded, blurred, profile or low-light faces.",
        "",
        "## How to use",
        "",
        "Without softbio installed (the model's code is in this repository):",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline(model="{repo_id}", trust_remote_code=True)',
        'faces = pipe("photo.jpg")  # one dict per face: box, age (label, scores, years), gender, emotion',
        "```",
        "",
        "With softbio installed:",
        "",
        "```python",
        "import softbio_hf  # registers the soft-biometrics task",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("soft-biometrics", model="{repo_id}")',
        "```",
        "",
        "The model alone, on face crops:",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        "logits = model(**processor(images=face_crop, return_tensors='pt')).logits  # {'age': ..., 'gender': ...}",
        "```",
        "",
        *(onnx_usage(repo_id, config) if exported else []),
        "## Licence",
        "",
        f"The weights and code here: {LICENSE.upper()}. The base model and the benchmarks have terms of their own:",
        "",
        "| source | licence or terms | where they are stated |",
        "|---|---|---|",
        *(f"| {name} | {terms} | {url} |" for name, terms, url in DATA_TERMS),
        "",
        f"The most restrictive is {MOST_RESTRICTIVE}'s (non-commercial research, by agreement): weights trained on it "
        "may inherit its terms; check them for your use.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------- space
def stage_space(out: Path, model_repo: str, repo_id: str) -> list[str]:
    """app.py, the packages it imports (the library and the demo's own), requirements, examples, and a README
    whose header names the model."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "app.py", out / "app.py")
    for package in (PACKAGE, DEMO_PACKAGE):
        (out / package.name).mkdir(exist_ok=True)
        for source in package.glob("*.py"):
            shutil.copy(source, out / package.name / source.name)
    (out / "examples").mkdir(exist_ok=True)
    for source in (REPO_ROOT / "examples").glob("*.jpg"):
        shutil.copy(source, out / "examples" / source.name)
    requirements = [
        line
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and requirement_name(line) not in TRAINING_ONLY
    ]
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (out / "README.md").write_text(space_readme(model_repo, repo_id))
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()


def space_readme(model_repo: str, repo_id: str) -> str:
    import gradio

    header = {
        "title": repo_id.split("/")[-1],
        "emoji": "🙂",
        "colorFrom": "indigo",
        "colorTo": "blue",
        "sdk": "gradio",
        "sdk_version": gradio.__version__,
        "app_file": "app.py",
        "pinned": False,
        "license": LICENSE,
        "models": [model_repo],  # app.py serves the first model listed here
        "short_description": "Age group, gender and emotion of every face, one CLIP pass",
    }
    import yaml

    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {header['title']}\n\n"
        f"Upload a photo: every face gets a box, an age group (and years), gender and emotion, from "
        f"[{model_repo}](https://huggingface.co/{model_repo}). Photos are analysed in memory, only for the browser "
        "that sent them; the server's upload cache is emptied of photos older than two minutes, every minute.\n"
    )


def onnx_usage(repo_id: str, config) -> list[str]:
    """The card's snippet for the exported model: onnxruntime alone, no torch, no softbio."""
    size = config.image_size
    return [
        "Exported for CPU serving (`onnx/model.onnx`, `openvino/`): with onnxruntime alone, no torch or softbio,",
        f"on face crops resized to {size}x{size} and normalised with `preprocessor_config.json`'s mean and std:",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime",
        "from huggingface_hub import hf_hub_download",
        "",
        f'session = onnxruntime.InferenceSession(hf_hub_download("{repo_id}", "onnx/model.onnx"))',
        f"crops = np.zeros((1, 3, {size}, {size}), np.float32)  # your normalised face crops",
        f"logits = dict(zip({list(config.tasks)}, session.run(None, {{'pixel_values': crops}})))",
        "```",
        "",
        'Or through the pipeline: `pipeline("soft-biometrics", model=..., backend="onnx")` (or "openvino").',
        "",
    ]


# -------------------------------------------------------------------------------------------- upload
def signed_in(token: str | None):
    """The Hub client and the user the token signs in as, asked first: no staging or export before a missing
    token, the offline switch or a dead network is said."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    offline = "The Hub is off limits here (HF_HUB_OFFLINE=1): unset it to push, or use --dry-run --out DIR."
    if constants.HF_HUB_OFFLINE:
        raise HubError(offline)
    api = HfApi(token=token)
    try:
        return api, api.whoami()
    except (LocalTokenNotFoundError, HfHubHTTPError) as error:
        raise HubError(f"No valid Hugging Face token ({error}). {LOGIN_HINT}") from error
    except OfflineModeIsEnabled as error:
        raise HubError(offline) from error
    except Exception as error:  # a dead network surfaces as the HTTP client's own error types, no OSError
        raise HubError(
            f"Could not reach the Hugging Face Hub ({type(error).__name__}: {error}); nothing was uploaded. Check the "
            "network, or look first with --dry-run --out DIR."
        ) from error


def upload(
    folder: Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    message: str,
    account=None,
) -> str:
    """One commit holding the whole folder; the repo is created if needed, an existing one updated. `account` is
    signed_in's answer when the caller checked the token before staging."""
    from huggingface_hub import CommitOperationAdd

    api, user = account or signed_in(token)
    try:
        api.create_repo(
            repo_id,
            repo_type=repo_type,
            private=private,
            exist_ok=True,
            space_sdk="gradio" if repo_type == "space" else None,
        )
        if revision and not create_pr:
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        # create_commit, not upload_folder: upload_folder may split a large folder into several commits
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        commit = api.create_commit(
            repo_id,
            operations,
            repo_type=repo_type,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as error:  # one commit: whatever failed, nothing is half-uploaded
        raise HubError(f"Upload to {repo_id} failed ({error}); nothing was committed. {LOGIN_HINT}") from error
    name = user.get("name", "?") if isinstance(user, dict) else "?"
    return f"{getattr(commit, 'commit_url', commit)} (as {name})"


def push_model(
    model_dir: str | Path,
    repo_id: str,
    *,
    results: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    merge: bool = False,
    dry_run_to: str | Path | None = None,
    export: bool = False,
) -> str:
    """What `push` does; `train.train --push-to-hub` calls it at the end of a run."""
    model_dir = Path(model_dir)
    if dry_run_to is not None:
        out = dry_run_folder(dry_run_to)
        with folder_written_whole(out) as staging:  # the whole folder or none: a failed stage leaves no half
            files = stage_model(model_dir, staging, repo_id, Path(results) if results else None, merge, export)
        return f"dry run: {len(files)} files in {out} (nothing uploaded)"
    account = signed_in(token)  # before the staging: an export takes long to be told the token is missing
    with tempfile.TemporaryDirectory(prefix="softbio-push-") as staging:
        stage_model(model_dir, Path(staging), repo_id, Path(results) if results else None, merge, export)
        return upload(
            Path(staging),
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            account=account,
            message=f"Upload softbio model from {model_dir.name}",
        )


def dry_run_folder(dry_run_to: str | Path) -> Path:
    """--out of a dry run, checked before any staging: a new or empty folder we can write."""
    out = Path(dry_run_to)
    if out.exists() and not out.is_dir():
        raise HubError(f"--out {out} is a file; the dry run writes a folder: give a new or empty folder.")
    if (reason := unwritable_reason(out)) is not None:
        raise HubError(f"--out {out} cannot be written: {reason}; give a new or empty folder elsewhere.")
    if out.exists() and any(out.iterdir()):
        raise HubError(f"--out {out} is not empty; give an empty or new folder for the dry run.")
    return out


def push_space(repo_id: str, model_repo: str, *, private=False, token=None, dry_run_to=None) -> str:
    if dry_run_to is not None:
        out = dry_run_folder(dry_run_to)
        with folder_written_whole(out) as staging:
            files = stage_space(staging, model_repo, repo_id)
        return f"dry run: {len(files)} files in {out} (nothing uploaded)"
    account = signed_in(token)  # before the staging, as for a model
    with tempfile.TemporaryDirectory(prefix="softbio-space-") as staging:
        stage_space(Path(staging), model_repo, repo_id)
        return upload(
            Path(staging), repo_id, repo_type="space", private=private, account=account, message="Upload softbio demo"
        )


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.hub",
        description="Publish a softbio checkpoint (with its model card) or the demo Space to the Hugging Face Hub, "
        f"in one commit. {LOGIN_HINT}",
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a checkpoint with its model card and evaluation")
    push.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/lora/best)")
    push.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    push.add_argument("--results", default=None, help="results.json of python -m train.evaluate, for the card")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to commit to (created if needed)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--merge", action="store_true", help="merge unmerged adapters before uploading")
    push.add_argument(
        "--export", action="store_true", help="also upload ONNX and OpenVINO exports (onnx/, openvino/), same commit"
    )
    push.add_argument("--token", default=None, help="Hugging Face token (default: hf auth login / HF_TOKEN)")
    push.add_argument("--dry-run", action="store_true", help="write the folder to --out instead of uploading")
    push.add_argument("--out", default=None, help="folder for --dry-run")
    space = commands.add_parser("space", help="upload the Gradio demo as a Space serving a model")
    space.add_argument("--repo-id", required=True, help="USER/NAME of the Space")
    space.add_argument("--model", required=True, help="the model repo the Space serves (USER/NAME)")
    space.add_argument("--private", action="store_true", help="create the Space private")
    space.add_argument("--token", default=None, help="Hugging Face token (default: hf auth login / HF_TOKEN)")
    space.add_argument("--dry-run", action="store_true", help="write the folder to --out instead of uploading")
    space.add_argument("--out", default=None, help="folder for --dry-run")
    return parser


def check_repo_id(repo_id: str, option: str = "--repo-id") -> None:
    """huggingface_hub's own rule, and a namespace: USER/NAME or ORG/NAME."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"{option} {repo_id!r} is not a Hub repo id: {error}") from None
    if "/" not in repo_id:
        raise HubError(f"{option} {repo_id!r}: use USER/NAME (or ORG/NAME).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dry_run and not args.out:
            raise HubError("--dry-run writes to a folder: give it with --out DIR.")
        check_repo_id(args.repo_id)
        out = args.out if args.dry_run else None
        if args.command == "push":
            message = push_model(
                args.model,
                args.repo_id,
                results=args.results,
                private=args.private,
                revision=args.revision,
                create_pr=args.create_pr,
                token=args.token,
                merge=args.merge,
                dry_run_to=out,
                export=args.export,
            )
        else:
            message = push_space(args.repo_id, args.model, private=args.private, token=args.token, dry_run_to=out)
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
