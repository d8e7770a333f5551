"""Training: metric learning over a run's embeddings (pytorch-metric-learning losses, miners and samplers).

`head` is the learned projection and the encoder that applies it to new photos; `stage` is
`cbir train-embedder`. Trained vectors are an ordinary embeddings set, so nothing downstream changes.
"""
