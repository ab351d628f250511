"""Training: the loop (loop), batches and augmentation (batches), what a run trains on (data), the loss
(losses), optimiser and schedule (optim), the HR teacher (teacher) and the fitted LR degradation (degradation)."""
