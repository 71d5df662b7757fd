"""Using a trained model: likelihoods, evaluation, sampling, BN re-adjustment and serving."""
