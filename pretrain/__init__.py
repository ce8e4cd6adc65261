"""Training side: config schema, models, DeepSpeed engine, training loop, checkpoints.

Modules: ``config`` (schema), ``config_loader``, ``models/``, ``distributed`` (rank set-up,
CPU/gloo or GPU/nccl), ``ds_config`` (the DeepSpeed dict), ``engine`` (LM -> DeepSpeed),
``optim`` (AdamW groups), ``schedule`` (lr), ``trainer`` (the loop), ``bad_steps`` (skipped
steps, fp16's loss-scale floor), ``run_checks``
(refuse bad input early), ``checkpoint`` (complete-or-ignored checkpoints), ``preemption``
(signals, requeue exit code 75), ``run_log`` (stdout/JSONL/TensorBoard/W&B), ``flops``
(per-mixer FLOPs for MFU), ``memory`` (per-GPU estimate), ``export`` (safetensors), ``cli``,
``demo``, ``dry_run``.
"""
