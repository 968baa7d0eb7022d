"""Task modules and data modules for the `lorafa` command: GLUE, WMT16 translation, instruction tuning, math
(MetaMathQA -> GSM8K)."""

from lightning_lorafa.tasks.common import TaskDataModule, TaskModule
from lightning_lorafa.tasks.glue import GLUE_TASKS, GlueDataModule, SequenceClassifier
from lightning_lorafa.tasks.instruction import InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.math import MathDataModule, MathTuner
from lightning_lorafa.tasks.report import FitReport
from lightning_lorafa.tasks.translation import TranslationDataModule, Translator

__all__ = [
    "GLUE_TASKS",
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
