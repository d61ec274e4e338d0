"""`python3 -m mefbench.gpu_check`: the prepared device check for a machine with a GPU.

Run from the repository root with ``PYTHONPATH=.`` (``benchmarks/gpu_check.sh`` does that); the
project need not be installed. It writes ``gpu_check.json`` and ``gpu_check.log`` to ``--out``
(default ``$OUT`` if set, else ``reports/gpu``). The parts, in order (:mod:`.parts`):

``bench``        ``mefbench bench --device cuda``, every part, each row synchronised.
``train_step``   one training step of the paper's model (``paper-t2-mef-cifar10``: 3×32×32,
                 batch 64, hidden 128, 8 blocks, steps (8, 4, 2)) and of the Glow-like model
                 (:data:`mefbench.presets.GLOW_LIKE` applied to it), each in float32 and under
                 ``set_amp("bf16")``: images/s over timed steps after warm-up, peak memory.
``epoch_check``  the paper preset's model on ``patches32`` at batch 64 through
                 :func:`mefbench.training.train` for 2 short epochs, and again stopped after one
                 epoch and resumed: expm statistics, EMA bits/dim, checkpoint, resume.
``ddp``          a 2-process DistributedDataParallel step (NCCL) and a short ``train`` under it,
                 only where ``torch.cuda.device_count() >= 2``; recorded as skipped otherwise.

Each part runs in its own process under its own time cap (:data:`CAPS`), and the whole check
within :data:`BUDGET_S` (:mod:`.runner`): a part that raises, hangs or kills its CUDA context is
recorded in ``errors`` and the next part starts in a fresh process. Inside a part every item (a
bench part, a model × precision, a run) has its own try/except, and the part's results are saved
after each item, so what finished before a time-out is kept. The JSON is rewritten after every
part.

JSON layout (``SCHEMA`` 1)::

    schema, command, tiny, date (UTC, the start), updated_at, wall_s, exit_status
    environment   mefbench.env.environment(device): {device, device_type, device_count, cuda, cudnn,
                   nccl, driver, gpu_memory_gb, capability, tf32_matmul, tf32_cudnn, mefbench, python,
                   torch, numpy, scipy, pandas, git_commit, platform, processor, cpu_count,
                   torch_threads}
    budget        {total_s, parts: [{part, cap_s, wall_s, status}]}   status: ok, error,
                   timeout, skipped, not run, interrupted
    bench         as ``mefbench bench --json`` writes it ({rows: [...], quick, threads, device,
                   machine, versions, command}) plus parts: [{part, rows, wall_s}]
    train_step    [{model, mixing, coupling, precision, batch, image_shape, hidden, blocks, steps,
                    params, warmup_steps, timed_steps, step_ms, images_per_s, peak_memory_mb,
                    memory_source, expm_m_mean, expm_m_max, first_bpd, last_bpd, note}]
    epoch_check   [{check, value, ok, note}]
    ddp           [{check, value, ok, note}]   (one "skipped" row where it did not run)
    errors        [{part, item, error, traceback}]

``--tiny`` runs the same code on tiny models, few steps and ``bench --quick`` (seconds on a CPU:
what the tests run with ``--device cpu``).
"""

from __future__ import annotations

from .parts import HEAD_STD, PARTS, PRECISIONS, Sizes, away_from_identity, measure_train_step, step_models
from .runner import BUDGET_S, CAPS, JSON_NAME, LOG_NAME, Check, Options, main, part_caps, run_check

__all__ = [
    "BUDGET_S",
    "CAPS",
    "HEAD_STD",
    "JSON_NAME",
    "LOG_NAME",
    "PARTS",
    "PRECISIONS",
    "Check",
    "Options",
    "Sizes",
    "away_from_identity",
    "main",
    "measure_train_step",
    "part_caps",
    "run_check",
    "step_models",
]
