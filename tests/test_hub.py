"""train/hub.py: the Hub is out of reach, so uploads are intercepted at huggingface_hub's API boundary."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets_fixtures import make_utkface
from gradio_client import Client, handle_file
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError
from remote import run_isolated
from serving import running_app

from softbio_hf import SoftBioModel
from train import hub
from train.data import prepare
from train.evaluate import main as evaluate_main

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = {
    "configuration_softbio.py",
    "modeling_softbio.py",
    "checkpoint_files.py",
    "methods.py",
    "mtlora.py",
    "pipeline_softbio.py",
    "faces.py",
    "hub_access.py",
    "runtimes.py",
    "video.py",
    "images.py",
    "runtime_light.py",
}


@dataclass
class Recorded:
    repos: list
    commits: list


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1; these ones act as if the Hub were reachable (its calls intercepted)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_api(monkeypatch, online):
    """Record what would go to the Hub: repo creation and the commit with its files (contents read at once)."""
    recorded = Recorded([], [])

    def create_repo(self, repo_id, **kwargs):
        recorded.repos.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source.read()
        recorded.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setenv("HF_TOKEN", "hf_intercepted")  # a logged-in user; nothing reaches the Hub with it
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "tester"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **k: recorded.repos.append({"branch": k}))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # upload_folder asks the Hub to validate the card's YAML: the card must parse here instead
    monkeypatch.setattr(
        HfApi, "_validate_yaml", lambda self, content, **k: recorded.validated.append(ModelCard(content))
    )
    return recorded


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_clip_dir):
    """A merged LoRA checkpoint and its results.json (with plots) from train.evaluate."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = SoftBioModel.from_clip(tiny_clip_dir, pooling="attention").apply_method("lora", rank=2)
    model.save_pretrained(root / "unmerged")
    model.merge_adapters().save_pretrained(root / "best")
    make_utkface(root / "raw")
    prepare("utkface", root / "raw", root / "utkface", image_size=32)
    args = [
        "--model",
        str(root / "best"),
        "--data",
        str(root / "utkface"),
        "--split",
        "train",
        "--out",
        str(root / "eval"),
    ]
    assert evaluate_main(args) == 0
    return root


def test_push_uploads_one_commit_with_weights_code_card_and_evaluation(evaluated, hub_api, tiny_clip_dir):
    message = hub.push_model(evaluated / "best", "me/softbio-lora", results=evaluated / "eval" / "results.json")
    assert "commit" in message and "tester" in message
    assert hub_api.repos == [
        {"repo_id": "me/softbio-lora", "repo_type": "model", "private": False, "exist_ok": True, "space_sdk": None}
    ]
    assert len(hub_api.commits) == 1
    files = hub_api.commits[0]["files"]
    expected = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval/results.json"}
    assert expected | CODE_FILES <= set(files)
    assert "eval/confusion_utkface_age.png" in files and "eval/reliability_gender.png" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_softbio.SoftBioModel"
    assert config["custom_pipelines"]["soft-biometrics"]["impl"] == "pipeline_softbio.SoftBiometricsPipeline"
    assert config["adapter"]["merged"] is True
    card = ModelCard(files["README.md"].decode())
    results = json.loads((evaluated / "eval" / "results.json").read_text())
    scored = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scored[("utkface age", "accuracy")] == pytest.approx(
        results["results"]["utkface"]["age"]["accuracy"], abs=0.01
    )
    assert scored[("utkface gender", "f1")] == pytest.approx(
        results["results"]["utkface"]["gender"]["macro_f1"], abs=0.01
    )
    assert card.data.base_model is None  # built from a local CLIP folder: Hub metadata takes repo ids only
    text = card.text
    for section in ("## Intended uses", "## Out-of-scope uses", "## Limitations and biases", "## Licence"):
        assert section in text
    assert "hiring" in text and "binary" in text and "trust_remote_code=True" in text
    assert "| utkface | age | race |" in text  # the fairness table
    low, high = results["summary"]["ci"]["overall"]  # evaluate's default bootstrap: intervals reach the card
    assert f"[{low:.2f}, {high:.2f}]" in text
    from train.hub import DATA_TERMS

    for name, terms, url in DATA_TERMS:  # the licence table: each source, its terms and where they are stated
        assert f"| {name} | {terms} | {url} |" in text
    assert "The most restrictive is RAF-DB's" in text
    assert "Not evaluated" not in text


def test_a_card_without_results_says_not_evaluated(evaluated, tmp_path):
    hub.push_model(evaluated / "best", "me/softbio-lora", dry_run_to=tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "Not evaluated" in card.text and not card.data.eval_results
    assert "model-index" not in (tmp_path / "out" / "README.md").read_text()


def test_revision_and_pull_request_are_passed_on(evaluated, hub_api):
    hub.push_model(evaluated / "best", "me/softbio-lora", revision="v2", private=True)
    hub.push_model(evaluated / "best", "me/softbio-lora", create_pr=True)
    assert hub_api.repos[0]["private"] is True and hub_api.repos[1] == {
        "branch": {"repo_type": "model", "branch": "v2", "exist_ok": True}
    }
    assert hub_api.commits[0]["revision"] == "v2" and hub_api.commits[1]["create_pr"] is True


REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["softbio_hf"] = None
    sys.modules["peft"] = None
    import torch
    from transformers import AutoModel, pipeline
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules")
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    torch.save(dict(logits), sys.argv[3])
    pipe = pipeline(model=sys.argv[1], trust_remote_code=True, dtype="float32")
    faces = pipe(sys.argv[4], detector="none")
    print(len(faces), sorted(faces[0]))
    """
)


def test_dry_run_folder_loads_as_remote_code_and_pipeline(evaluated, tmp_path):
    out = tmp_path / "dry"
    assert (
        hub.main(["push", "--model", str(evaluated / "best"), "--repo-id", "me/x", "--dry-run", "--out", str(out)]) == 0
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    photo = str(REPO / "examples" / "grace_hopper.jpg")
    stdout = run_isolated(tmp_path, REMOTE, str(out), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"), photo)
    assert stdout.startswith("1 ") and "'emotion'" in stdout
    with torch.no_grad():
        expected = SoftBioModel.from_pretrained(evaluated / "best").eval()(x).logits
    shipped = torch.load(tmp_path / "out.pt")
    for task, logits in expected.items():
        torch.testing.assert_close(shipped[task], logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refused
def test_unmerged_adapters_are_refused_unless_merge(evaluated, tmp_path, capsys):
    args = ["push", "--model", str(evaluated / "unmerged"), "--repo-id", "me/x", "--dry-run", "--out"]
    assert hub.main([*args, str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "unmerged lora adapters" in error and "--merge" in error
    assert hub.main([*args, str(tmp_path / "b"), "--merge"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["adapter"]["merged"] is True


def test_a_plain_clip_checkpoint_is_refused(tiny_clip_dir, tmp_path, capsys):
    args = ["push", "--model", str(tiny_clip_dir), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "o")]
    assert hub.main(args) == 2
    assert "not a softbio one" in capsys.readouterr().err


def test_results_for_other_labels_are_refused(evaluated, tmp_path, capsys):
    results = json.loads((evaluated / "eval" / "results.json").read_text())
    results["tasks"]["gender"] = ["female", "male"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    args = [
        "push",
        "--model",
        str(evaluated / "best"),
        "--repo-id",
        "me/x",
        "--results",
        str(tmp_path / "results.json"),
    ]
    assert hub.main([*args, "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "other labels for ['gender']" in capsys.readouterr().err


def test_no_token_says_how_to_log_in(evaluated, monkeypatch, capsys, online):
    def no_token(self, *args, **kwargs):
        raise LocalTokenNotFoundError("Token is required")

    monkeypatch.setattr(HfApi, "whoami", no_token)
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("uploaded without a token"))
    # said before the staging, whose --export alone took 45 s to be told the token is missing
    monkeypatch.setattr(hub, "stage_model", lambda *a, **k: pytest.fail("staged (and exported) before the token"))
    assert hub.main(["push", "--model", str(evaluated / "best"), "--repo-id", "me/x", "--export"]) == 2
    error = capsys.readouterr().err
    assert "hf auth login" in error and "HF_TOKEN" in error and "Traceback" not in error


def test_offline_is_a_clear_error_and_nothing_is_sent(evaluated, monkeypatch, capsys):
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("uploaded while offline"))
    monkeypatch.setattr(hub, "stage_model", lambda *a, **k: pytest.fail("staged (and exported) while offline"))
    assert hub.main(["push", "--model", str(evaluated / "best"), "--repo-id", "me/x"]) == 2  # HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- space
def test_space_dry_run_starts_and_answers_analyze(evaluated, tmp_path):
    out = tmp_path / "space"
    model = str(evaluated / "best")
    assert hub.main(["space", "--repo-id", "me/demo", "--model", model, "--dry-run", "--out", str(out)]) == 0
    staged_files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "softbio_hf/modeling_softbio.py", "examples/astronaut.jpg"} <= (
        staged_files
    )
    demo_package = {f"softbio_demo/{p.name}" for p in (REPO / "softbio_demo").glob("*.py")}
    assert {"softbio_demo/uploads.py", "softbio_demo/models.py"} <= demo_package <= staged_files  # app.py's parts
    readme = (out / "README.md").read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and f"- {model}" in readme
    assert "deleted right after" not in readme and "older than two minutes" in readme  # what app.py really does
    assert "peft" not in (out / "requirements.txt").read_text()
    sys.path.insert(0, str(out))
    try:
        import importlib

        staged = importlib.import_module("app")
        importlib.reload(staged)
        assert staged.space_model() == model  # the header points the app at the model
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("app", None)
    with running_app(out / "app.py", evaluated / "best", tmp_path) as served:
        faces = Client(served["url"], verbose=False).predict(
            handle_file(str(out / "examples" / "astronaut.jpg")), "haar", 0, api_name="/analyze"
        )
    assert len(faces) == 1 and "emotion" in faces[0]


def test_train_push_to_hub_calls_the_same_push(tiny_clip_dir, tmp_path, hub_api):
    from train.config import load_config
    from train.train import run_training

    make_utkface(tmp_path / "raw")
    prepare("utkface", tmp_path / "raw", tmp_path / "utk", image_size=32)
    settings = [
        f"model.backbone={tiny_clip_dir}",
        f"data.eval=[{tmp_path / 'utk'}]",
        "data.test_split=train",
        f"output_dir={tmp_path / 'zs'}",
        "train.device=cpu",
    ]
    summary = run_training(load_config("zs", settings), push_to_hub="me/softbio-zs")
    assert "commit" in summary["pushed"]
    files = hub_api.commits[0]["files"]
    assert "eval/results.json" in files and "model.safetensors" in files
    assert ModelCard(files["README.md"].decode()).data.eval_results


def test_the_card_names_a_hub_base_model_never_a_local_path(tmp_path):
    from softbio_hf.hub_access import hub_repo_id

    assert hub_repo_id("openai/clip-vit-large-patch14-336") == "openai/clip-vit-large-patch14-336"
    (tmp_path / "clip").mkdir()
    for local in (str(tmp_path / "clip"), "./clip", "../models/clip", "/abs/missing/clip", None):
        assert hub_repo_id(local) is None, local


@pytest.mark.parametrize("listed", ["../../escape.txt", "/etc/hostname", "sub/plot.png", ""])
def test_plot_paths_read_from_results_never_leave_their_folders(evaluated, tmp_path, capsys, listed):
    """results.json is read, not trusted: a plot listed as a path is refused before anything is written, so a
    dry run cannot overwrite (or an upload carry) a file outside the folders given."""
    victim = tmp_path / "escape.txt"
    victim.write_text("mine")
    results = json.loads((evaluated / "eval" / "results.json").read_text())
    results["plots"] = [*results["plots"], listed]
    (tmp_path / "a" / "eval").mkdir(parents=True)
    (tmp_path / "a" / "eval" / "results.json").write_text(json.dumps(results))
    for name in results["plots"][:-1]:
        shutil.copy(evaluated / "eval" / name, tmp_path / "a" / "eval" / name)
    out = tmp_path / "a" / "out"  # out/eval/../../escape.txt is tmp_path/a/escape.txt; from eval/ it is tmp_path's
    args = ["push", "--model", str(evaluated / "best"), "--repo-id", "me/x", "--dry-run", "--out", str(out)]
    assert hub.main([*args, "--results", str(tmp_path / "a" / "eval" / "results.json")]) == 2
    error = capsys.readouterr().err
    assert f"lists the plot {listed!r}, which is not a file name beside it" in error and "Traceback" not in error
    assert victim.read_text() == "mine" and not out.exists()


@pytest.mark.parametrize("command", ["push", "space"])
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_a_dry_run_out_that_is_a_file_or_under_one_is_named(command, where, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    out = tmp_path / "a-file" if where == "file" else tmp_path / "a-file" / "below"
    args = [command, "--model", str(tmp_path), "--repo-id", "me/x", "--dry-run", "--out", str(out)]
    assert hub.main(args) == 2
    error = capsys.readouterr().err
    assert f"--out {out}" in error and "a-file is a file" in error and "Traceback" not in error
    assert (tmp_path / "a-file").read_text() == "keep me"
