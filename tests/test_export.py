"""python -m softbio_hf.export and the pipeline's exported backends: the same answers as torch, on the CPU."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from noise import foreign_warnings
from photos import assert_same_answers, tiled_faces
from PIL import Image
from tiny import TINY_VISION
from transformers import pipeline

from softbio_hf import SoftBioConfig, SoftBioModel
from softbio_hf.export import main as export_main
from softbio_hf.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]
ASTRONAUT = str(REPO / "examples" / "astronaut.jpg")


def in_own_process(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The exporters and runtimes run in a process of their own (tests/exported_run.py says why)."""
    env = {**__import__("os").environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def served_by(folder: Path, backend: str, *photos: str) -> dict:
    return json.loads(in_own_process(str(REPO / "tests" / "exported_run.py"), str(folder), backend, *photos).stdout)


GRACE = str(REPO / "examples" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny checkpoint with both exports beside it, made by the command a user runs."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    model.save_pretrained(folder)
    result = in_own_process("-m", "softbio_hf.export", "--model", str(folder), "--out", str(folder))
    (folder.parent / "export-stderr.txt").write_text(result.stderr)
    return folder


def test_the_export_prints_no_warning_that_is_not_ours(exported):
    """Tracing warnings that do not apply, a deprecated property read by the trace, transformers' causal-LM loss
    for a classifier: each fixed or silenced where it arises, so a warning that does show means something."""
    stderr = (exported.parent / "export-stderr.txt").read_text()
    assert foreign_warnings(stderr) == [], stderr[-3000:]


def test_the_export_writes_both_formats_and_says_what_it_holds(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["tasks"] == ["age", "gender", "emotion"] and manifest["batch"] == "dynamic"
    assert manifest["input"] == {"name": "pixel_values", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert manifest["outputs"] == ["logits_age", "logits_gender", "logits_emotion"]
    assert {"torch", "onnx", "openvino"} <= set(manifest["versions"]) and manifest["opset"] >= 17
    for name in ("onnx/model.onnx", "openvino/openvino_model.xml", "openvino/openvino_model.bin", "config.json"):
        assert (exported / name).is_file(), name


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_the_pipeline_serves_the_same_json_from_each_backend(exported, backend, tmp_path):
    reference = pipeline("soft-biometrics", model=str(exported), dtype="float32")
    group = tmp_path / "four-faces.png"  # four faces: a batch of 8 takes faces of several photos
    Image.fromarray(tiled_faces()).save(group)
    photos = [ASTRONAUT, str(group), GRACE]
    served = served_by(exported, backend, *photos)
    assert served["backend"] == backend
    assert served["faces"] == served["alone"]  # over a list, each photo gets exactly its answer alone
    assert_same_answers(served["batched"], served["alone"])
    for expected, got in zip(reference(photos, detector="haar"), served["faces"], strict=True):
        assert len(expected) == len(got) >= 1
        for face_expected, face_got in zip(expected, got, strict=True):
            assert face_got["box"] == face_expected["box"]
            for task in ("age", "gender", "emotion"):
                assert face_got[task]["label"] == face_expected[task]["label"]
                for label, p in face_expected[task]["scores"].items():
                    assert face_got[task]["scores"][label] == pytest.approx(p, abs=1e-4)


def test_an_export_folder_without_weights_is_served_by_the_pipeline(exported, tmp_path):
    """The export module's own flow: an export in a folder of its own (no model.safetensors) served by
    pipeline("soft-biometrics", model=OUT, backend=...); torch cannot run it and says which backend does."""
    import shutil

    own = tmp_path / "softbio-onnx"
    own.mkdir()
    for name in ("manifest.json", "config.json"):
        shutil.copy(exported / name, own / name)
    for name in ("onnx", "openvino"):
        shutil.copytree(exported / name, own / name)
    reference = pipeline("soft-biometrics", model=str(exported), dtype="float32")
    served = served_by(own, "onnx", ASTRONAUT, GRACE)
    assert served["backend"] == "onnx"
    assert_same_answers(served["faces"], reference([ASTRONAUT, GRACE], detector="haar"))
    with pytest.raises(ValueError, match=r'no torch weights: backend="torch".*backend="onnx" or backend="openvino"'):
        pipeline("soft-biometrics", model=str(own))


def test_the_batch_command_takes_a_backend_and_gives_the_same_rows(exported, tmp_path):
    common = [GRACE, ASTRONAUT, "--model", str(exported), "--detector", "haar", "--num-workers", "2"]
    common += ["--dtype", "float32"]
    assert predict_main([*common, "--out", str(tmp_path / "torch.csv")]) == 0
    in_own_process(
        "-m", "softbio_hf.predict", *common, "--out", str(tmp_path / "exported.csv"), "--backend", "openvino"
    )
    torch_rows = list(csv.DictReader((tmp_path / "torch.csv").open()))
    exported_rows = list(csv.DictReader((tmp_path / "exported.csv").open()))
    assert len(torch_rows) == len(exported_rows) >= 2
    for expected, got in zip(torch_rows, exported_rows, strict=True):
        for key in ("source", "xmin", "ymin", "age_label", "gender_label", "emotion_label"):
            assert got[key] == expected[key], key
        assert float(got["gender_score"]) == pytest.approx(float(expected["gender_score"]), abs=1e-4)


def test_the_onnx_artifact_runs_where_neither_torch_nor_softbio_can_be_imported(exported, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = SoftBioModel.from_pretrained(exported).eval()(pixel_values=torch.from_numpy(x)).logits
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, json\n"
        "sys.modules['torch'] = None; sys.modules['softbio_hf'] = None  # neither can be imported\n"
        "import numpy as np, onnxruntime\n"
        "session = onnxruntime.InferenceSession(sys.argv[1] + '/onnx/model.onnx', providers=['CPUExecutionProvider'])\n"
        "out = session.run(None, {'pixel_values': np.load(sys.argv[2])})\n"
        "names = [o.name for o in session.get_outputs()]\n"
        "print(json.dumps({n: o.tolist() for n, o in zip(names, out)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(exported), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logits = json.loads(result.stdout)
    for task, value in expected.items():
        np.testing.assert_allclose(np.array(logits[f"logits_{task}"]), value.numpy(), atol=1e-5)


def test_unmerged_adapters_are_refused_with_the_way_to_export(tmp_path, capsys):
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    model.apply_method("lora", rank=2)
    model.save_pretrained(tmp_path / "lora")
    assert export_main(["--model", str(tmp_path / "lora"), "--out", str(tmp_path / "out")]) == 2
    assert "unmerged lora adapters" in capsys.readouterr().err and not (tmp_path / "out" / "onnx").exists()
    in_own_process(
        "-m", "softbio_hf.export", "--model", str(tmp_path / "lora"), "--out", str(tmp_path / "out"), "--merge"
    )
    assert (tmp_path / "out" / "onnx" / "model.onnx").is_file()


def test_a_backend_without_an_export_says_how_to_make_one(tmp_path):
    torch.manual_seed(0)
    SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION})).save_pretrained(
        tmp_path / "plain"
    )
    with pytest.raises(FileNotFoundError, match=r"python -m softbio_hf.export --model .*plain --format onnx"):
        pipeline("soft-biometrics", model=str(tmp_path / "plain"), backend="onnx")
    with pytest.raises(ValueError, match=r"backend='tensorrt'"):
        pipeline("soft-biometrics", model=str(tmp_path / "plain"), backend="tensorrt")


def test_hub_push_export_uploads_the_artifacts_in_the_same_commit_with_a_card_that_runs_them(exported, tmp_path):
    plain = tmp_path / "plain"
    SoftBioModel.from_pretrained(exported).save_pretrained(plain)
    argv = ["push", "--model", str(plain), "--repo-id", "me/x", "--export", "--dry-run", "--out", str(tmp_path / "p")]
    in_own_process("-m", "train.hub", *argv)
    staged = tmp_path / "p"
    for name in ("onnx/model.onnx", "openvino/openvino_model.xml", "manifest.json", "model.safetensors"):
        assert (staged / name).is_file(), name
    assert "auto_map" in json.loads((staged / "config.json").read_text())  # the checkpoint's own config
    card = (staged / "README.md").read_text()
    assert "import onnxruntime" in card and 'hf_hub_download("me/x", "onnx/model.onnx")' in card


def test_the_demo_serves_the_onnx_export(exported, tmp_path):
    from gradio_client import Client, handle_file
    from serving import running_app

    expected = pipeline("soft-biometrics", model=str(exported), dtype="float32")(GRACE, detector="haar")
    with running_app(REPO / "app.py", exported, tmp_path, env={"SOFTBIO_BACKEND": "onnx"}) as served:
        faces = Client(served["url"], verbose=False).predict(handle_file(GRACE), "haar", 0, api_name="/analyze")
        log = served["log"].read_text()
    assert "compiling" not in log  # an exported model is not torch.compiled
    assert [f["gender"]["label"] for f in faces] == [f["gender"]["label"] for f in expected]
    assert faces[0]["age"]["scores"]["0-2"] == pytest.approx(expected[0]["age"]["scores"]["0-2"], abs=1e-3)


def test_auto_picks_openvino_where_its_export_is_there_and_says_so_when_it_is_not(exported, tmp_path):
    assert served_by(exported, "auto", GRACE)["backend"] == "openvino"
    torch.manual_seed(0)
    SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION})).save_pretrained(
        tmp_path / "plain"
    )
    result = in_own_process(str(REPO / "tests" / "exported_run.py"), str(tmp_path / "plain"), "auto", GRACE)
    assert json.loads(result.stdout)["backend"] == "torch" and json.loads(result.stdout)["faces"][0]
    said = [line for line in result.stderr.splitlines() if "backend auto" in line]
    assert len(said) == 1 and "torch, since" in said[0] and "softbio_hf.export" in said[0]


def run_exported(folder: Path, backend: str, *photos: str) -> subprocess.CompletedProcess:
    """tests/exported_run.py, whatever its exit code."""
    env = {**__import__("os").environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    command = [sys.executable, str(REPO / "tests" / "exported_run.py"), str(folder), backend, *(photos or (GRACE,))]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def light_run(folder: Path, backend: str, batch_size: str = "-") -> dict:
    """The torch-free runtime on both photos (tests/light_run.py): its answers or its error."""
    return json.loads(
        in_own_process(str(REPO / "tests" / "light_run.py"), str(folder), backend, batch_size, GRACE).stdout
    )


def copy_of(exported: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(exported, tmp_path / "model"))


def tiny_model(seed: int) -> SoftBioModel:
    torch.manual_seed(seed)
    return SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))


def test_weights_saved_over_an_exported_checkpoint_are_refused_and_auto_serves_torch(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    tiny_model(1).save_pretrained(folder)  # new weights over the checkpoint; the old export stays beside them
    for backend in ("onnx", "openvino"):
        refused = run_exported(folder, backend)
        assert refused.returncode != 0 and "are not the ones its" in refused.stderr, refused.stderr[-2000:]
        assert "python -m softbio_hf.export --model" in refused.stderr
    auto = run_exported(folder, "auto")
    assert auto.returncode == 0 and json.loads(auto.stdout)["backend"] == "torch"
    assert "are not the ones its openvino export was made from" in auto.stderr


def test_a_changed_artifact_is_refused_and_a_broken_file_or_manifest_is_named(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    onnx_file = folder / "onnx" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of a weight: still a valid file, a different model
    onnx_file.write_bytes(bytes(data))
    assert "model.onnx is not the file its manifest names" in light_run(folder, "onnx")["error"]
    # A broken OpenVINO file whose manifest was rewritten to match: named, and auto falls back to torch.
    (folder / "openvino" / "openvino_model.xml").write_text("<net>not a model")
    manifest = json.loads((folder / "manifest.json").read_text())
    from softbio_hf.runtimes import file_digest

    manifest["digests"]["openvino/openvino_model.xml"] = file_digest(folder / "openvino" / "openvino_model.xml")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    auto = run_exported(folder, "auto")
    assert auto.returncode == 0 and json.loads(auto.stdout)["backend"] == "torch", auto.stderr[-2000:]
    assert "openvino could not load" in auto.stderr and "Traceback" not in auto.stderr
    (folder / "manifest.json").write_text("{not json")
    assert "manifest.json cannot be read" in light_run(folder, "openvino")["error"]


def test_exporting_one_format_again_removes_the_other_so_auto_cannot_pick_it(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    tiny_model(2).save_pretrained(folder)
    in_own_process("-m", "softbio_hf.export", "--model", str(folder), "--format", "onnx", "--out", str(folder))
    assert not (folder / "openvino").exists()
    assert json.loads((folder / "manifest.json").read_text())["formats"] == ["onnx"]
    auto = run_exported(folder, "auto")
    assert json.loads(auto.stdout)["backend"] == "torch" and "no openvino export" in auto.stderr
    assert "faces" in light_run(folder, "onnx")  # the new onnx export serves the new weights


KILLED_MID_EXPORT = """
import os, signal, sys
import softbio_hf.export as export

def killed(*args, **kwargs):  # the onnx file is written; the process dies before the rest
    os.kill(os.getpid(), signal.SIGKILL)

export.write_openvino = killed
sys.exit(export.main(sys.argv[1:]))
"""


def test_a_kill_mid_export_leaves_the_old_export_whole(exported, tmp_path):
    from softbio_hf.runtimes import file_digest

    folder = copy_of(exported, tmp_path)
    before = {path: file_digest(path) for path in folder.rglob("*") if path.is_file()}
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_EXPORT, "--model", str(folder), "--out", str(folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9
    assert {path: file_digest(path) for path in folder.rglob("*") if path.is_file()} == before
    assert "faces" in light_run(folder, "onnx") and "faces" in light_run(folder, "openvino")


HOLD_LOCK = """
import sys
from pathlib import Path
from softbio_hf.safe_files import holding

with holding(Path(sys.argv[1]), "held"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def test_a_second_export_at_once_and_a_folder_of_another_checkpoint_are_refused(exported, tmp_path, capsys):
    from softbio_hf.export import export_lock

    out = tmp_path / "own"
    # Another process holds the export's lock (a POSIX lock is per process), as a running export would.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(export_lock(out))],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert export_main(["--model", str(exported), "--format", "onnx", "--out", str(out)]) == 2
    finally:
        holder.communicate("", timeout=60)
    assert "another export is writing" in capsys.readouterr().err and not out.exists()
    other = tmp_path / "other"
    tiny_model(3).save_pretrained(other)
    assert export_main(["--model", str(exported), "--format", "onnx", "--out", str(other)]) == 2
    assert "holds another checkpoint's weights" in capsys.readouterr().err and not (other / "manifest.json").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert export_main(["--model", str(exported), "--format", "onnx", "--out", str(tmp_path / "notes")]) == 2
    assert "neither empty nor an earlier export" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_an_export_through_a_symlinked_out_lands_where_the_link_points(exported, tmp_path):
    real, link = tmp_path / "served" / "model-v1", tmp_path / "current"
    real.mkdir(parents=True)
    link.symlink_to(real, target_is_directory=True)  # what a server is pointed at
    in_own_process("-m", "softbio_hf.export", "--model", str(exported), "--format", "onnx", "--out", str(link))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "manifest.json").read_text())["formats"] == ["onnx"]
    assert (real / "onnx" / "model.onnx").is_file()


def test_a_fixed_batch_size_is_honoured_by_the_batch_command(exported, tmp_path):
    folder = tmp_path / "model"
    SoftBioModel.from_pretrained(exported).save_pretrained(folder)
    in_own_process(
        "-m", "softbio_hf.export", "--model", str(folder), "--format", "onnx", "--out", str(folder), "--batch-size", "1"
    )
    assert json.loads((folder / "manifest.json").read_text())["batch"] == 1
    common = [GRACE, ASTRONAUT, "--model", str(folder), "--detector", "haar", "--num-workers", "0", "--batch-size", "2"]
    in_own_process("-m", "softbio_hf.predict", *common, "--out", str(tmp_path / "rows.csv"), "--backend", "onnx")
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "ok"]
