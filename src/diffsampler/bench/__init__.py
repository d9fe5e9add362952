"""diffsampler bench: accuracy per NFE and overhead per step, side by side with the peers."""
