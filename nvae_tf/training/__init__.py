"""Training: the objective and its schedules, the optimizer, the loop, callbacks and tuning."""
