"""Packaging: the repo's folders install under one `deltamem` namespace (no generic top-level names such as
`kernels`, which Hugging Face's kernel-hub package also uses), and triton is a Linux-only dependency the CPU
path never needs. Checked on a wheel built from this tree, on the installed metadata, and in subprocesses."""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("agent", "cli", "memory", "model", "kernels", "tools", "ui", "server")


def test_wheel_holds_only_the_deltamem_namespace(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the working tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".ruff_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # e.g. project.license as a TOML table, a package left out
    (wheel,) = (tmp_path / "dist").glob("deltamem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"deltamem", next(t for t in tops if t.endswith(".dist-info"))}
    assert {n.split("/")[1] for n in names if n.startswith("deltamem/")} == {*FOLDERS, "app.py"}
    assert "deltamem/model/data/smollm2_hybrid.safetensors" in names and "deltamem/ui/deltamem.tcss" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "deltamem = deltamem.app:main" in entry


def test_hf_kernels_and_ours_import_side_by_side(tmp_path):
    code = (
        "import importlib.util as u, json, kernels, deltamem.kernels as ours\n"
        "print(json.dumps({'hf': kernels.__file__, 'hf_has_get_kernel': hasattr(kernels, 'get_kernel'),\n"
        "  'ours': ours.__file__, 'generic': [n for n in ('model', 'agent', 'memory', 'tools', 'ui', 'app')\n"
        "                                     if u.find_spec(n) is not None]}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["hf_has_get_kernel"] and "site-packages" in got["hf"]
    assert Path(got["ours"]).resolve() == ROOT / "kernels" / "__init__.py" and got["generic"] == []


def test_static_analysers_can_resolve_the_package():
    """What a static analyser sees (pyright, jedi and mypy read site-packages' .pth paths and look for folders
    there; they run no import hook): `make test` installs in setuptools' strict editable mode, whose .pth file names
    a folder that holds deltamem/, each module a link to this tree's file."""
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    listed = [Path(line.strip()) for d in dirs for pth in Path(d).glob("*.pth")
              for line in pth.read_text().splitlines() if line.strip() and not line.startswith(("#", "import"))]
    found = [d / "deltamem" for d in listed if (d / "deltamem").is_dir()]
    assert found, f"no .pth folder holds deltamem/: {listed}"
    for module in ("app.py", "cli/__init__.py", "model/options.py", "kernels/__init__.py", "memory/store.py"):
        assert (found[0] / module).resolve() == ROOT / module, module


def test_triton_is_required_on_linux_only():
    (req,) = [r for r in map(Requirement, importlib.metadata.requires("deltamem")) if r.name == "triton"]
    env = {"python_version": "3.11", "python_full_version": "3.11.7", "extra": ""}
    assert req.marker.evaluate({**env, "sys_platform": "linux"})
    assert not req.marker.evaluate({**env, "sys_platform": "darwin"})
    assert not req.marker.evaluate({**env, "sys_platform": "win32"})


def test_the_cpu_path_runs_without_triton(tmp_path):
    """triton made unimportable (as on a machine without it): generate and an agent run work."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # `import triton` now fails, as when it is not installed\n"
        "from deltamem.app import main\n"
        "a = main(['generate', '--model', 'random', '--max-new-tokens', '3', 'hello'])\n"
        f"b = main(['run', '--model', 'random', '--repo', {str(tmp_path)!r}, '--db', {str(tmp_path / 'm.db')!r},\n"
        "          '--max-new-tokens', '3', '--json', 'hi'])\n"
        "assert sys.modules['triton'] is None\n"
        "print(a, b)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    *_, run_json, codes = r.stdout.splitlines()
    assert codes in ("0 0", "0 3")  # generate done; run answered or stopped at its step limit (random weights)
    assert json.loads(run_json)["outcome"] in ("answer", "step_limit")


def _in_checkout(path: str | None) -> bool:
    """A file of this tree's own folders (not of a virtualenv that happens to live inside it)."""
    p = Path(path or "/").resolve()
    return p.is_relative_to(ROOT) and not p.is_relative_to(Path(sys.prefix).resolve())


def test_no_repo_folder_is_a_top_level_module_in_the_test_process():
    """pytest runs with --import-mode=importlib and through its console script, so the repo root is not on sys.path:
    its folders are reached only as deltamem.*, and `import kernels` (which transformers >= 5.25 does while loading a
    model) finds Hugging Face's package."""
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path), sys.path
    for name in (*FOLDERS, "app"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not _in_checkout(spec.origin), (name, spec)
    import kernels

    assert hasattr(kernels, "get_kernel") and not _in_checkout(kernels.__file__)


LOAD_A_MODEL = """
import json, sys, tempfile
import torch, transformers
cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
with tempfile.TemporaryDirectory() as d:
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({m: getattr(sys.modules[m], "__file__", None) for m in ("kernels",) if m in sys.modules}))
"""


@pytest.mark.parametrize("folder", ["benchmarks", "scripts"])
def test_script_folders_shadow_no_distribution(folder, tmp_path):
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: no module there may be named like a module of
    an installed distribution, the standard library or the repo's folders (benchmarks/kernels.py once hid Hugging
    Face's `kernels` from transformers); and transformers loads a model there as it does anywhere."""
    names = {p.stem for p in (ROOT / folder).glob("*.py")}
    dists = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    taken = {*sys.stdlib_module_names, *dists, *FOLDERS, "app", "deltamem", "tests"}
    taken |= {canonicalize_name(d) for ds in dists.values() for d in ds}
    assert not {n for n in names if n in taken or canonicalize_name(n) in taken}
    code = f"import sys; sys.path.insert(0, {str(ROOT / folder)!r})\n" + LOAD_A_MODEL
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    for path in json.loads(r.stdout.splitlines()[-1]).values():
        assert not _in_checkout(path), path


def _pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a requirements lock written by `make lock`."""
    pins, name = {}, None
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name, version = line.split(" ")[0].split("==")
            name = canonicalize_name(name)
            pins[name] = (version, 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            pins[name] = (pins[name][0], pins[name][1] + 1)
    return pins


@pytest.mark.parametrize("lock, extras", [("demo", ()), ("test", ("test",))])
def test_the_lock_pins_every_requirement_within_pyproject_ranges(lock, extras):
    """requirements/*.txt is what `make demo`/`make test` install: each of pyproject's requirements (and theirs) is
    pinned, with hashes, at a version its range admits; torch is the CPU build. (A range changed without
    `make lock` fails here.)"""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(ROOT / "requirements" / f"{lock}.txt")
    assert all(n >= 1 for _, n in pins.values())
    env = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11", "extra": ""}
    wanted = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    for req in map(Requirement, wanted):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        version, _ = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (req, version)
    assert pins["torch"][0].endswith("+cpu")
