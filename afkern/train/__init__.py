"""``afkern-train``: two-stage AdapterFusion training (Pfeiffer et al., 2021) on afkern's fast path.

Stage 1 (``afkern-train adapters``) trains one single-task adapter (+ head) per task on a frozen
BERT-family model; stage 2 (``afkern-train fusion``) trains an AdapterFusion layer and a fresh head
on a target task over the frozen adapters, plots the mean fusion weights on the dev set, and can
prune the fusion to the k most-used adapters per layer; ``afkern-train demo`` runs both on small
GENERATED tasks. Data-parallel training with ``torchrun`` (DDP) is picked up from the environment.

Outputs are AdapterHub directories (readable by :func:`afkern.load_adapterhub` and the ``adapters``
package), heads as safetensors + JSON, metrics JSON files that later runs add to, and checkpoints;
every file is written atomically. A run never replaces earlier results without ``--overwrite``,
resumes only onto the same data and settings, and stops on Ctrl-C with a checkpoint.

Modules, one concern each:

- :mod:`.cli` the command line, the order of the checks, exit statuses;
- :mod:`.preflight` extras and output-directory checks before training;
- :mod:`.data` reading task files; :mod:`.demo_data` the generated demo tasks;
- :mod:`.batches` tokenised splits and epoch batches; :mod:`.dist` DDP plumbing;
- :mod:`.heads` the classification head; :mod:`.models` base model, fusion model, reloading;
- :mod:`.loop` the training loop (early stopping, resume, Ctrl-C); :mod:`.checkpoint` checkpoints;
- :mod:`.stages` stage 1 and stage 2; :mod:`.demo` both on generated data;
- :mod:`.prune` pruning and the pruned-model file; :mod:`.metrics` the metrics files;
- :mod:`.predict` ``afkern-train predict``: new texts through trained tasks, routed in one batch.
"""

from .checkpoint import CKPT_FORMAT, load_checkpoint, load_trainable_state, save_checkpoint, trainable_state
from .cli import build_parser, main, run
from .data import TaskData, data_fingerprint, load_task, parse_task_spec, read_records, read_table, write_jsonl
from .demo_data import GENERATED_NOTE, demo_vocabulary, make_demo_tasks
from .errors import DataError, TrainError
from .heads import AdapterClassifier, ClassificationHead, load_head, save_head
from .models import check_model_dir, default_model_dir, load_base_model, load_classifier, load_tokenizer
from .predict import Predictor, predict
from .prune import apply_pruned, load_pruned_spec, prune_block, prune_model

__all__ = [
    "main", "run", "build_parser", "TrainError", "DataError",
    "ClassificationHead", "AdapterClassifier", "save_head", "load_head",
    "default_model_dir", "check_model_dir", "load_base_model", "load_tokenizer", "load_classifier",
    "prune_block", "prune_model", "load_pruned_spec", "apply_pruned",
    "save_checkpoint", "load_checkpoint", "trainable_state", "load_trainable_state", "CKPT_FORMAT",
    "TaskData", "load_task", "parse_task_spec", "read_records", "read_table", "write_jsonl", "data_fingerprint",
    "make_demo_tasks", "demo_vocabulary", "GENERATED_NOTE", "Predictor", "predict",
]
