"""One training run, its modules in the order they act (train.run holds the flow):

spec      the composed Hydra config -> one checked RunSpec (architecture, routing knobs, the method object), or a
          ConfigError naming the key a user types; nothing built yet
resume    the checkpoint a run continues from, checked before its folder is touched
run       begin (precision, plan, the record of the setting) -> prepare (data, LightningModule, loggers,
          callbacks, Trainer) -> fit -> finish (routing analysis, downstream evaluation)
module    the LightningModule      optim      the optimizer recipe      callbacks / loggers / strategies
record    summary.json (RunSummary) and the compact records the report reads      precision  precision=auto

Nothing is imported here: `remoe.train.record` (what the report reads) loads without Lightning's Trainer.
"""
