"""Model families (range, anomaly), their feature windows, training loop and streaming scoring."""
