"""Former home of the trainer, kept importable: everything now lives in the package
:mod:`recsys_metric.training` (one module per concept). ``from recsys_metric.train import fit``
and the other names of the 1.x module, private ones included, keep working."""

from recsys_metric.training import *  # noqa: F403
from recsys_metric.training import __all__ as _training_all
from recsys_metric.training.autograd import AutogradStep as _AutogradStep
from recsys_metric.training.autograd import dense_optimizer as _dense_optimizer
from recsys_metric.training.checkpoints import cpu_state as _cpu_state
from recsys_metric.training.checkpoints import save_checkpoint as _save_checkpoint
from recsys_metric.training.early_stopping import evaluation_number as _evaluation_number
from recsys_metric.training.fused import fused_update as _fused_update
from recsys_metric.training.fused import triplet_gradients as _triplet_gradients
from recsys_metric.training.kernel_step import kernel_csr as _kernel_csr
from recsys_metric.training.loop import CHUNK_TRIPLETS as _CHUNK_TRIPLETS
from recsys_metric.training.loop import SEED_STRIDE as _SEED_STRIDE
from recsys_metric.training.loop import fit_at_rate as _fit_at_rate
from recsys_metric.training.loop import lr_factor as _lr_factor
from recsys_metric.training.optim import RENORM_EPS as _RENORM_EPS
from recsys_metric.training.optim import project_rows_ as _project_rows_
from recsys_metric.training.optim import row_update_ as _row_update_
from recsys_metric.training.sources import Chunk as _Chunk
from recsys_metric.training.sources import NegativeSource as _NegativeSource
from recsys_metric.training.sources import epoch_chunks as _chunks

__all__ = list(_training_all)
__all__ += [  # the 1.x private names, for code that reached into the module
    "_AutogradStep",
    "_CHUNK_TRIPLETS",
    "_Chunk",
    "_NegativeSource",
    "_RENORM_EPS",
    "_SEED_STRIDE",
    "_chunks",
    "_cpu_state",
    "_dense_optimizer",
    "_evaluation_number",
    "_fit_at_rate",
    "_fused_update",
    "_kernel_csr",
    "_lr_factor",
    "_project_rows_",
    "_row_update_",
    "_save_checkpoint",
    "_triplet_gradients",
]
