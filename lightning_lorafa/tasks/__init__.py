"""Task modules and data modules for the `lorafa` command: GLUE, WMT16 translation, instruction tuning."""

from lightning_lorafa.tasks.common import TaskDataModule, TaskModule
from lightning_lorafa.tasks.glue import GLUE_TASKS, GlueDataModule, SequenceClassifier
from lightning_lorafa.tasks.instruction import InstructionDataModule, InstructionTuner
from lightning_lorafa.tasks.report import FitReport
from lightning_lorafa.tasks.translation import TranslationDataModule, Translator

__all__ = [
    "GLUE_TASKS",
    "FitReport",
    "GlueDataModule",
    "InstructionDataModule",
    "InstructionTuner",
    "SequenceClassifier",
    "TaskDataModule",
    "TaskModule",
    "TranslationDataModule",
    "Translator",
]
