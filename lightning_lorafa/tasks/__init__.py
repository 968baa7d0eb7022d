"""Task modules and data modules for the `lorafa` command: GLUE, WMT16 translation, instruction tuning, math
(MetaMathQA -> GSM8K), code (Code-Feedback / Magicoder -> HumanEval), chat (WizardLM-Evol-Instruct -> MT-Bench).

They need the ``recipes`` extra (``pip install "lightning-lorafa[recipes]"``); importing this package without it
raises ``ModuleNotFoundError`` naming the missing packages and the extra. The rest of ``lightning_lorafa`` needs
none of them.
"""

from lightning_lorafa.tasks import _requirements  # noqa: F401  (raises without the recipes extra)
from lightning_lorafa.tasks.chat import ChatDataModule, ChatTuner
from lightning_lorafa.tasks.code import CodeDataModule, CodeTuner
from lightning_lorafa.tasks.common import TaskDataModule, TaskModule
from lightning_lorafa.tasks.glue import GLUE_TASKS, GlueDataModule, SequenceClassifier
from lightning_lorafa.tasks.instruction import InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.math import MathDataModule, MathTuner
from lightning_lorafa.tasks.report import FitReport
from lightning_lorafa.tasks.translation import TranslationDataModule, Translator

__all__ = [
    "GLUE_TASKS",
    "ChatDataModule",
    "ChatTuner",
    "CodeDataModule",
    "CodeTuner",
    "FitReport",
    "GlueDataModule",
    "InstructionDataModule",
    "InstructionTuner",
    "MathDataModule",
    "MathTuner",
    "SequenceClassifier",
    "TaskDataModule",
    "TaskModule",
    "TranslationDataModule",
    "Translator",
]
