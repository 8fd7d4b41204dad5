"""Pretraining (ET-OREO, ET-ORO, 3D-EMGP, coordinate denoising) and fine-tuning.

- :mod:`.corpus` - sources tagged equilibrium / off-equilibrium, one frame table, the sharded epoch sampler
- :mod:`.corpus_pack` - a corpus in one compact file (``--pack-corpus``), and :func:`open_corpus` (packed or built)
- :mod:`.leakage` - strict / paper leakage protocols against the fine-tuning targets
- :mod:`.qm9xtb` - oreo-qm9-xtb: GFN2-xTB MD frames of QM9 molecules (``oreo data qm9-xtb``), a corpus source
- :mod:`.noise` - Gaussian and Riemann-Gaussian perturbations and their score targets
- :mod:`.objectives` - one small loss module per objective, the presets, :class:`PretrainTask`
- :mod:`.trainer` - :class:`Pretrainer` (single process or DistributedDataParallel), configs
- :mod:`.finetune` - force-field fine-tuning (a pretrained backbone, a new head, the training trainer)
- :mod:`.property` - QM9 property models and their trainer
- :mod:`.distributed` - process groups (torchrun, gloo/NCCL), a local multi-process launcher
- :mod:`.cli` - ``oreo pretrain`` / ``oreo finetune``

Imports :mod:`forcefield.train` (its loop skeleton and trainer) and the layers below; imported by the ``oreo``
CLI and the benchmarks (and, by name, by :mod:`forcefield.io`, which reads property model files through the
format :mod:`.property` registers).
"""
from .corpus import Corpus, CorpusConfig, EpochSampler, SourceConfig, build_corpus, load_source
from .corpus_pack import load_packed_corpus, open_corpus, save_packed_corpus
from .finetune import FinetuneOptions, finetune_forcefield, load_pretrained
from .property import PropertyConfig, PropertyModel, finetune_property, load_property_model
from .leakage import LeakageConfig, apply_leakage_filter
from .objectives import METHODS, ObjectivesConfig, PretrainTask, build_objectives
from .trainer import PretrainConfig, Pretrainer, load_pretrain_config, pretrain_config_from_dict

__all__ = ["Corpus", "CorpusConfig", "EpochSampler", "SourceConfig", "build_corpus", "load_source",
           "load_packed_corpus", "open_corpus", "save_packed_corpus",
           "FinetuneOptions", "PropertyConfig", "PropertyModel", "finetune_forcefield", "finetune_property",
           "load_pretrained", "load_property_model", "LeakageConfig", "apply_leakage_filter", "METHODS",
           "ObjectivesConfig", "PretrainTask", "build_objectives", "PretrainConfig", "Pretrainer",
           "load_pretrain_config", "pretrain_config_from_dict"]
