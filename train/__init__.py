"""Training programs: ``python -m train.finetune`` and the pieces it is built from.

``data`` (datasets, loader), ``augment`` (on-device transforms), ``config``
(the typed run config), ``optim`` (optimizer, parameter groups), ``steps``
(jitted train/eval steps), ``checkpoint`` (Orbax), ``metrics`` (JSONL,
TensorBoard, plots), ``mmd`` (domain-adaptation loss).
"""
