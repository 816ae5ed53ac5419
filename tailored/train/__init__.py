"""One training run: settings, the phase schedule, the teacher, the prune-now transition, checkpoints, callbacks,
sharding and the rank watchdog, orchestrated by the LightningModule (:mod:`tailored.train.module`)."""
