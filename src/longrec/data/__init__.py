"""Data: raw logs -> canonical behaviour table -> prepared dataset -> batches."""
