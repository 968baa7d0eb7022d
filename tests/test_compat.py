"""Private APIs of other libraries only in ``_compat``; the package imports, and trains, when one is missing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lorafa"
OTHER_LIBRARIES = ("torch", "lightning", "transformers", "bitsandbytes", "peft", "triton", "safetensors", "datasets")
#: torch's multi-tensor ops: every torch optimizer is built on them (documented as the "foreach" implementation).
ALLOWED = ("torch._foreach_",)


#: Private attributes other libraries document for subclasses: Lightning's docs build ``Callback.state_key`` from
#: ``self._generate_state_key(...)``.
ALLOWED_ATTRIBUTES = ("_generate_state_key",)


def own_names(root: Path = PACKAGE) -> set[str]:
    """Every name the package itself defines, binds or assigns as an attribute (functions, classes, variables,
    arguments, ``self.x = ...``, ``setattr(obj, "x", ...)``): a private attribute read outside this set belongs to
    another library."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
            elif _attribute_call(node, ("setattr",)):
                names.add(node.args[1].value)
    return names


def _attribute_call(node: ast.AST, functions: tuple[str, ...]) -> bool:
    """``getattr(obj, "name", ...)`` and the like, with a constant name."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in functions
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


def private_uses(path: Path, own: set[str] = frozenset()) -> list[str]:
    """``module:line name`` for each private name of another library that ``path`` imports or reads: a private
    module or name imported from one, a private attribute of one of its modules, and a private attribute of any
    object (``obj._x``, ``getattr(obj, "_x")``) that is not in ``own``, the names the package defines itself."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[(alias.asname or alias.name).split(".")[0]] = alias.name
                if alias.name.split(".")[0] in OTHER_LIBRARIES and _private_path(alias.name):
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in OTHER_LIBRARIES:
                continue
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if _private_path(node.module) or _private(alias.name):
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            module = aliases.get(node.value.id) if isinstance(node.value, ast.Name) else None
            if module and module.split(".")[0] in OTHER_LIBRARIES:
                name = f"{module}.{node.attr}"
                if not name.startswith(ALLOWED):
                    found.append(f"{path.name}:{node.lineno} {name}")
            elif not module and node.attr not in own and node.attr not in ALLOWED_ATTRIBUTES:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        elif _attribute_call(node, ("getattr", "hasattr")) and _private(node.args[1].value):
            if node.args[1].value not in own and node.args[1].value not in ALLOWED_ATTRIBUTES:
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_path(module: str) -> bool:
    return any(_private(part) for part in module.split("."))


def test_no_module_but_compat_uses_a_private_name_of_another_library():
    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_compat.py"]
    own = own_names()
    offenders = [use for path in paths for use in private_uses(path, own)]
    assert offenders == []


def test_the_checker_finds_private_imports_and_attributes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom torch._C._autograd import x\nfrom lightning.fabric import _secret\n"
        "y = torch._softmax_backward_data\nz = torch._foreach_add_\n"
        "def f(model, strategy):\n"
        "    model._mine = 1\n"
        "    return model._mine, model._orig_mod, getattr(strategy, '_kwargs', None), hasattr(model, '_mine')\n"
    )
    assert private_uses(sample, own={"_mine"}) == [
        "sample.py:2 from torch._C._autograd import x",
        "sample.py:3 from lightning.fabric import _secret",
        "sample.py:4 torch._softmax_backward_data",
        "sample.py:8 model._orig_mod",
        "sample.py:8 getattr(strategy, '_kwargs', None)",
    ]


#: Module methods users' models are called through: ``forward``, and the MLP chunk transformers' BERT family calls.
FORWARD_METHODS = ("forward", "feed_forward_chunk")


def _makes_a_callable(value: ast.AST | None) -> bool:
    """A lambda, ``functools.partial(...)`` or ``types.MethodType(...)``: what shadows a method on an instance."""
    return isinstance(value, ast.Lambda) or (
        isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in ("partial", "MethodType")
    )


def instance_patches(path: Path) -> list[str]:
    """``module:line code`` for each place ``path`` replaces a method on an object: an attribute or ``setattr``
    named ``forward``/``feed_forward_chunk``, or set to a lambda, partial or bound method, and any use of
    ``types.MethodType``. Behaviour is added by hooks, by a subclass, or by assigning ``__class__`` as torch's
    ``fully_shard`` does, never by shadowing a method on the instance."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and (
                    target.attr in FORWARD_METHODS or _makes_a_callable(node.value)
                ):
                    found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            named = _attribute_call(node, ("setattr",)) and node.args[1].value in FORWARD_METHODS
            if named or (len(node.args) > 2 and _makes_a_callable(node.args[2])):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Attribute) and node.attr == "MethodType") or (
            isinstance(node, ast.Name) and node.id == "MethodType"
        ):
            found.append((node.lineno, ast.unparse(node)))
    return [f"{path.name}:{line} {code}" for line, code in sorted(found)]


def test_no_module_replaces_a_method_on_an_instance():
    offenders = [use for path in sorted(PACKAGE.rglob("*.py")) for use in instance_patches(path)]
    assert offenders == []


def test_the_checker_finds_instance_patches(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import functools, types\n"
        "def f(module, method, fn):\n"
        "    module.forward = functools.partial(fn, module)\n"
        "    setattr(module, method, types.MethodType(fn, module))\n"
        "    setattr(module, 'feed_forward_chunk', fn)\n"
        "    module.__class__ = type(module)\n"
        "    module.scale = 2.0\n"
        "    setattr(module, method, 3)\n"
        "    module.hook = lambda *args: None\n"
    )
    assert instance_patches(sample) == [
        "sample.py:3 module.forward = functools.partial(fn, module)",
        "sample.py:4 setattr(module, method, types.MethodType(fn, module))",
        "sample.py:4 types.MethodType",
        "sample.py:5 setattr(module, 'feed_forward_chunk', fn)",
        "sample.py:9 module.hook = lambda *args: None",
    ]


BREAK = {
    "saved_tensors_hooks": "import torch._C._autograd as m; del m._push_saved_tensors_default_hooks",
    "softmax_backward": "import torch; del torch._softmax_backward_data",
    "sdpa_attention": "import transformers.modeling_utils, transformers.integrations.sdpa_attention as m; "
    "del m.sdpa_attention_forward",
    "sharded_checkpoints": "import lightning.fabric.strategies.model_parallel as m; del m._is_sharded_checkpoint",
    "save_pretrained_merged": "import transformers; transformers.PreTrainedModel.save_pretrained = len",
    "compiled_modules": "import torch._dynamo.eval_frame as m; del m.OptimizedModule",
}

CHECK = {
    # the seed-kept dropout runs as an autograd.Function: same values and gradient as with the hooks
    "saved_tensors_hooks": """
import torch
from lightning_lorafa.adapters.dropout import seeded_dropout
x = torch.randn(64, 16, requires_grad=True)
torch.manual_seed(3); y = seeded_dropout(x, 0.5)
assert type(y.grad_fn).__name__ == "_SeededDropoutBackward", type(y.grad_fn).__name__
y.sum().backward()
assert torch.equal(x.grad, (y != 0).float() * 2.0)
""",
    # the CPU attention's backward from public ops: gradients as autograd's through a stored-mask reference
    "softmax_backward": """
import torch
from lightning_lorafa.adapters.seeded_attention import _RecomputedDropoutAttention
q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
assert torch.autograd.gradcheck(
    lambda q, k, v: _RecomputedDropoutAttention.apply(q, k, v, None, None, 0.5, 0.0, torch.tensor(1)), (q, k, v)
)
""",
    # attention dropout keeps its mask: the model stays on its own attention, and says why
    "sdpa_attention": """
import sys; sys.path.insert(0, "tests")
from conftest import tiny_roberta
from lightning_lorafa.model.dropouts import keep_dropout_seeds
model = tiny_roberta(dropout=0.1)
changed, kept, _ = keep_dropout_seeds(model)
assert model.config._attn_implementation == "sdpa" and changed
assert "SDPA attention function is missing" in next(iter(kept.values())), kept
""",
    # save_pretrained writes the adapters' own layout: no hook is registered, and the warning said why at import
    "save_pretrained_merged": """
import sys; sys.path.insert(0, "tests")
from conftest import tiny_llama
from lightning_lorafa import apply_lorafa
from lightning_lorafa.model import merge
model = tiny_llama()
apply_lorafa(model, r=4)
assert merge.fold_on_save_pretrained(model) == [] and not merge._save_hooks
""",
    # a compiled model is taken as it is (its names carry _orig_mod.); plain models convert as before
    "compiled_modules": """
import sys; sys.path.insert(0, "tests")
from conftest import TwoLayerNet
from lightning_lorafa import apply_lorafa, _compat
model = TwoLayerNet()
assert _compat.uncompiled(model) is model and apply_lorafa(model, r=2) == ["fc1", "fc2"]
""",
    "sharded_checkpoints": """
import pytest
from lightning_lorafa import LoraFAModelParallelStrategy
strategy = LoraFAModelParallelStrategy()
strategy._lightning_module = object()
with pytest.raises(RuntimeError, match="cannot load checkpoints with this Lightning version"):
    strategy.model = object(); strategy.load_checkpoint("x.ckpt")
""",
}


@pytest.mark.parametrize("feature", sorted(BREAK))
def test_the_package_imports_with_a_private_api_missing_and_only_that_feature_falls_back(feature):
    code = f"""
import warnings
{BREAK[feature]}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lightning_lorafa
    from lightning_lorafa import _compat
assert list(_compat.missing_features) == [{feature!r}], _compat.missing_features
messages = [str(w.message) for w in caught]
assert any({feature!r} in m and "is disabled" in m for m in messages), messages
{CHECK[feature]}
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
