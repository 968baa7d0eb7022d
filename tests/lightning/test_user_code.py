"""Users' own code with the library added as the README says: their wrappers and heads, several optimizers and
manual optimization, adapters their forward never reaches, and what they see in the console."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import VOCAB, quiet_trainer
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_lorafa import LoraFA, apply_lorafa, attach_gradient_correction, load_from_checkpoint, prepare_model
from lightning_lorafa.adapters.find import lorafa_layers
from lightning_lorafa.model.select import find_task_heads

ROOT = Path(__file__).resolve().parents[2]


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)  # its pooler would take no part in the loss


class Classifier(pl.LightningModule):
    """A user's wrapper: a pretrained backbone and a fresh ``nn.Linear(hidden, 2)`` under a name of their own."""

    def __init__(self, head: str = "linear", manual: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = tiny_bert()
        setattr(self, head, nn.Linear(32, 2))
        self.automatic_optimization = not manual

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.hparams.head)(self.backbone(input_ids=input_ids).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = F.cross_entropy(self(input_ids), input_ids[:, 0] % 2)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        return loss

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        head = getattr(self, self.hparams.head)
        return [torch.optim.AdamW(self.backbone.parameters(), lr=self.hparams.lr),
                torch.optim.AdamW(head.parameters(), lr=self.hparams.lr)]


def data() -> DataLoader:
    x = torch.randint(3, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=4)


def fit(tmp_path: Path, module: pl.LightningModule, steps: int = 4, **callback_args) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[LoraFA(r=8, **callback_args)])
    trainer.fit(module, data())
    return trainer


@pytest.mark.parametrize("head", ["linear", "fc", "decoder"])
def test_a_wrappers_own_head_trains_fully_is_saved_and_reloads(tmp_path, head, caplog):
    module = Classifier(head)
    before = getattr(module, head).weight.detach().clone()
    with caplog.at_level("INFO"):
        trainer = fit(tmp_path, module)
    assert module.lorafa_config.modules_to_save == [head]
    assert f"LoRA-FA: training {head} fully and saving it with the adapter: a new layer of Classifier, beside its " \
           "pretrained backbone (BertModel)" in caplog.text
    assert not torch.equal(getattr(module, head).weight, before)
    assert not any(name.startswith(head) for name in lorafa_layers(module))  # never LoRA-adapted
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    input_ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    module.eval()
    reloaded = load_from_checkpoint(Classifier, tmp_path / "run.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids), module(input_ids))


def test_the_output_layer_of_a_plain_torch_model_trains_fully_and_is_not_adapted():
    model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
    assert find_task_heads(model) == ["decoder"]
    converted = apply_lorafa(model, r=4)
    assert "decoder" not in converted and model.decoder.weight.requires_grad
    assert model.lorafa_config.modules_to_save == ["decoder"]
    sequential = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    apply_lorafa(sequential, r=4)  # 8 -> 2 is narrower than r: a head is never left out as a narrow gate
    assert sequential.lorafa_config.modules_to_save == ["2"] and sequential[2].weight.requires_grad


def test_a_head_tied_to_the_input_embeddings_is_not_trained():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny_bert()
            self.lm_head = nn.Linear(32, VOCAB, bias=False)
            self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight

    model = TiedLM()
    assert find_task_heads(model) == []
    apply_lorafa(model, r=4)
    assert not model.lm_head.weight.requires_grad


def test_two_optimizers_under_manual_optimization_train_as_one_and_warn_of_nothing(tmp_path):
    automatic = Classifier()
    fit(tmp_path / "a", automatic)
    manual = Classifier(manual=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "m", manual, steps=8)  # Lightning counts each of the two optimizers' steps
    assert not [str(w.message) for w in caught if "LoRA-FA" in str(w.message)]
    trained = [(name, p) for name, p in automatic.named_parameters() if p.requires_grad]
    assert any(name.endswith("lora_B") for name, _ in trained)
    assert any(name.startswith("linear.") for name, _ in trained)
    for name, p in trained:
        assert torch.equal(p, manual.get_parameter(name)), name


def test_a_trainable_tensor_in_no_optimizer_is_named_once(tmp_path):
    class HeadOnly(Classifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.linear.parameters(), lr=1e-2)

    with pytest.warns(UserWarning, match=r"LoRA-FA: 12 trainable tensors are in no optimizer and will not train: "
                      r"backbone\.encoder\.layer\.0\.attention\.output\.dense\.lora_B"):
        fit(tmp_path, HeadOnly())


class UnusedLayer(nn.Module):
    """A model whose ``spare`` linear is never called in forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def test_an_adapter_without_gradient_is_named_at_the_first_step_in_plain_pytorch():
    model = UnusedLayer()
    prepare_model(model, r=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_gradient_correction(optimizer, model)
    for step in range(2):
        model(torch.randn(4, 8)).sum().backward()
        if step == 0:
            with pytest.warns(UserWarning, match=r"LoRA-FA: 1 of 2 adapters got no gradient in the first training step"
                              r": they do not reach the loss and will not train: spare\."):
                optimizer.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                optimizer.step()  # once only
        optimizer.zero_grad()


def test_an_adapter_without_gradient_is_named_in_a_lightning_run(tmp_path):
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = UnusedLayer()

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[LoraFA(r=4)])
    with pytest.warns(UserWarning, match=r"1 of 2 adapters got no gradient .* will not train: spare\. "):
        trainer.fit(Module(), loader)


def test_what_the_library_does_is_printed_in_plain_python_and_in_a_trainer_run(tmp_path):
    script = textwrap.dedent("""
        import torch
        import lightning.pytorch as pl
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_lorafa import LoraFA, apply_lorafa

        apply_lorafa(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), r=4)
        print("-- trainer --", flush=True)

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

            def training_step(self, batch, batch_idx):
                return self.net(batch[0]).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        pl.Trainer(max_steps=1, callbacks=[LoraFA(r=4)], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False).fit(
            Module(), DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=4))
    """)
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout
    plain, _, run = done.stdout.partition("-- trainer --")
    assert "LoRA-FA: training 2 fully and saving it with the adapter: the output layer of Sequential" in plain
    assert "LoRA-FA: training net.2 fully and saving it with the adapter: the output layer of Module" in run


def test_parameters_held_by_a_wrapper_itself_are_named_as_frozen():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = tiny_bert()
            self.temperature = nn.Parameter(torch.ones(1))
            self.head = nn.Linear(32, 2)

    model = Scaled()
    with pytest.warns(UserWarning, match=r"LoRA-FA: temperature are parameters of Scaled itself, outside its "
                      r"pretrained model and outside any module modules_to_save could name, so they stay frozen"):
        apply_lorafa(model, r=4)
    assert not model.temperature.requires_grad and model.head.weight.requires_grad


class BackboneAndHead(pl.LightningModule):
    """``self.model`` is the pretrained backbone the callback converts; the head sits beside it, outside."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()
        self.classifier = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.model(input_ids=input_ids).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return F.cross_entropy(self(input_ids), input_ids[:, 0] % 2)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_head_beside_the_converted_model_travels_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    module = BackboneAndHead()
    trainer = fit(tmp_path, module)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"]
    head = {f"classifier.{key}" for key in module.classifier.state_dict()}
    assert {key for key in state if key.startswith("classifier.")} == head
    assert not any(k.startswith("model.") and not k.endswith(("lora_A", "lora_B")) for k in state)
    input_ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    module.eval()
    with torch.no_grad():
        assert torch.equal(load_from_checkpoint(BackboneAndHead, tmp_path / "run.ckpt").eval()(input_ids),
                           module(input_ids))
    torch.manual_seed(5)  # another head: the resume must bring back the trained one
    resumed = BackboneAndHead()
    quiet_trainer(tmp_path, max_steps=4, callbacks=[LoraFA(r=8)]).fit(
        resumed, data(), ckpt_path=tmp_path / "run.ckpt")
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(input_ids), module(input_ids))  # 4 of 4 steps done already: nothing trained


def test_optimizers_stepped_after_separate_backward_passes_raise_no_false_warning(tmp_path):
    """A GAN-like loop: the head's optimizer steps after a backward pass that reaches only the head, then the
    backbone's after its own; each optimizer's B's are checked when it steps."""

    class Alternating(Classifier):
        def training_step(self, batch, batch_idx):
            (input_ids,) = batch
            backbone_opt, head_opt = self.optimizers()
            features = self.backbone(input_ids=input_ids).last_hidden_state[:, 0]
            self.manual_backward(F.cross_entropy(self.linear(features.detach()), input_ids[:, 0] % 2))
            head_opt.step()
            head_opt.zero_grad()
            self.manual_backward(features.square().mean())
            backbone_opt.step()
            backbone_opt.zero_grad()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, Alternating(manual=True), steps=4)
    assert not [str(w.message) for w in caught if "LoRA-FA" in str(w.message)]
