"""Training data: raw corpora -> tokenized indexed datasets -> samples -> micro-batches."""
